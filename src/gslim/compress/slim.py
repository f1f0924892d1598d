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


def _out_width(mod: nn.Module) -> int:
    return int(mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels)


def _in_width(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return int(mod.in_features)
    if isinstance(mod, nn.Conv2d):
        return int(mod.in_channels)
    return int(mod.num_features)


def column_offset(model: nn.Module, unit: Unit, layer: str) -> int:
    """Where ``unit``'s channels start in ``layer``'s input (0 unless it reads a concatenation):
    the current widths of what precedes the unit there."""
    before = unit.concat_before.get(layer, ())
    return sum(b if isinstance(b, int) else _out_width(model.get_submodule(b)) for b in before)


def unit_range(model: nn.Module, unit: Unit, layer: str) -> slice:
    """``unit``'s channels among ``layer``'s input (or a BatchNorm's features)."""
    off = column_offset(model, unit, layer)
    return slice(off, off + unit.width)


def layer_columns(model: nn.Module, unit: Unit, layer: str, idx: torch.Tensor) -> torch.Tensor:
    """``layer``'s input channels that remain when ``unit`` keeps ``idx`` of its current width."""
    if layer not in unit.concat_before:
        return idx
    off, total = column_offset(model, unit, layer), _in_width(model.get_submodule(layer))
    return torch.cat([torch.arange(off), off + idx, torch.arange(off + unit.width, total)])


def slim_unit(model: nn.Module, unit: Unit, keep: torch.Tensor | list[int], consumers: bool = True) -> None:
    """Keep only channels ``keep`` (indices into the unit's current width) of ``unit``.

    ``consumers=False`` leaves the consumers' input columns alone, for a caller that
    installs re-fitted consumer weights itself.
    """
    idx = torch.as_tensor(keep, dtype=torch.long).sort().values
    if idx.numel() == 0:
        raise GslimError(f"unit {unit.name}: cannot keep zero channels")
    readers = unit.inner_readers + (unit.consumers if consumers else [])
    # column ranges first: they depend on the widths before this unit's producers are cut
    cols = {name: layer_columns(model, unit, name, idx) for name in unit.members + readers}
    for name in unit.producers + unit.gate_producers:
        _cut_outputs(model.get_submodule(name), idx)
    for name in unit.members:
        _cut_member(model.get_submodule(name), cols[name])
    for name in readers:
        _cut_inputs(model.get_submodule(name), cols[name])
    unit.width = int(idx.numel())


def first_channels_copy(model: nn.Module, units: list[Unit], widths: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with each unit cut to its first ``widths[name]`` channels (units not
    in ``widths`` stay whole): the shapes of a slim model, for timing it (latency probes)."""
    import copy

    out = copy.deepcopy(model).eval()
    for u in copy.deepcopy(units):  # slimming updates the units it walks
        if widths.get(u.name, u.width) < u.width:
            slim_unit(out, u, torch.arange(widths[u.name]))
    return out


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
                    at = drop + column_offset(masked, unit, name)
                    masked.get_submodule(name).weight.index_fill_(1, at, 0.0)
    return masked


def unit_widths(units: list[Unit], original: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Current width of each unit (only those that were actually narrowed when ``original`` given)."""
    out = {}
    for u in units:
        if original is None or u.width < original[u.name]:
            out[u.name] = u.width
    return out
