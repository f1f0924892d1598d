"""Physical slimming: cut a unit's channels out of every layer that carries them.

Surgery happens *in place* on the existing module objects (their parameters and
buffers are replaced by sliced copies and their size attributes updated), so any
traced graph that refers to those modules stays valid while the greedy pass walks
through the network.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gslim.compress.units import Unit
from gslim.errors import GslimError


def _slice(mod: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    t = getattr(mod, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        mod._buffers[name] = new


def _cut_outputs(mod: nn.Module, idx: torch.Tensor) -> None:
    _slice(mod, "weight", idx, 0)
    _slice(mod, "bias", idx, 0)
    if isinstance(mod, nn.Conv2d):
        mod.out_channels = len(idx)
    elif isinstance(mod, nn.Linear):
        mod.out_features = len(idx)
    else:
        raise GslimError(f"cannot slim outputs of {type(mod).__name__}")


def _cut_inputs(mod: nn.Module, idx: torch.Tensor) -> None:
    _slice(mod, "weight", idx, 1)
    if isinstance(mod, nn.Conv2d):
        mod.in_channels = len(idx)
    elif isinstance(mod, nn.Linear):
        mod.in_features = len(idx)
    else:
        raise GslimError(f"cannot slim inputs of {type(mod).__name__}")


def _cut_member(mod: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _slice(mod, name, idx, 0)
        mod.num_features = len(idx)
    elif isinstance(mod, nn.Conv2d):  # depthwise or grouped with in == out: whole groups only
        per_group = mod.in_channels // mod.groups
        groups = idx.view(-1, per_group) if len(idx) % per_group == 0 else None
        if groups is None or not bool(
            (
                (groups[:, 0] % per_group == 0) & (groups - groups[:, :1] == torch.arange(per_group)).all(1)
            ).all()
        ):
            raise GslimError(f"cannot keep part of a group of {per_group} channels in grouped conv")
        _slice(mod, "weight", idx, 0)
        _slice(mod, "bias", idx, 0)
        mod.in_channels = mod.out_channels = len(idx)
        mod.groups = len(idx) // per_group
    else:
        raise GslimError(f"cannot slim channels of {type(mod).__name__}")


def slim_unit(model: nn.Module, unit: Unit, keep: torch.Tensor | list[int], consumers: bool = True) -> None:
    """Keep only channels ``keep`` (indices into the unit's current width) of ``unit``.

    ``consumers=False`` leaves the consumers' input columns alone, for a caller that
    installs re-fitted consumer weights itself.
    """
    idx = torch.as_tensor(keep, dtype=torch.long).sort().values
    if idx.numel() == 0:
        raise GslimError(f"unit {unit.name}: cannot keep zero channels")
    for name in unit.producers + unit.gate_producers:
        _cut_outputs(model.get_submodule(name), idx)
    for name in unit.members:
        _cut_member(model.get_submodule(name), idx)
    for name in unit.inner_readers + (unit.consumers if consumers else []):
        _cut_inputs(model.get_submodule(name), idx)
    unit.width = int(idx.numel())


def masked_copy(model: nn.Module, keeps: list[tuple[Unit, list[int] | torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` in which each unit's dropped channels are zeroed where they are read.

    The reference for testing slimming: it has the original shapes but computes exactly
    what the slimmed model computes.
    """
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for unit, keep in keeps:
            keep_set = set(int(i) for i in keep)
            drop = torch.tensor([i for i in range(unit.width) if i not in keep_set], dtype=torch.long)
            if drop.numel():
                for name in unit.readers:
                    masked.get_submodule(name).weight.index_fill_(1, drop, 0.0)
    return masked


def unit_widths(units: list[Unit], original: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Current width of each unit (only those that were actually narrowed when ``original`` given)."""
    out = {}
    for u in units:
        if original is None or u.width < original[u.name]:
            out[u.name] = u.width
    return out
