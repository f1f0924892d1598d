"""Ranking baselines: keep each unit's top-scored channels, without re-fit (L1 norm, BN scale,
random, the first channels)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gslim.compress.omp import channels_of
from gslim.compress.selection import SelectionRun, UnitReport
from gslim.compress.slim import slim_unit, unit_range
from gslim.compress.units import Unit

# ranking baselines


def l1_scores(work: nn.Module, u: Unit, gen: torch.Generator) -> torch.Tensor:
    """Sum of |weights| of each channel's producers (Li et al. 2017)."""
    device = next(work.parameters()).device
    total = torch.zeros(u.width, device=device)
    for p in u.producers:
        w = work.get_submodule(p).weight.detach()
        total += w.abs().reshape(w.shape[0], -1).sum(1)
    return total


def bn_scores(work: nn.Module, u: Unit, gen: torch.Generator) -> torch.Tensor:
    """|BN scale| of each channel (network slimming, Liu et al. 2017)."""
    device = next(work.parameters()).device
    total = torch.zeros(u.width, device=device)
    bns = [m for m in u.members if isinstance(work.get_submodule(m), nn.modules.batchnorm._BatchNorm)]
    if not bns:  # e.g. a classifier's hidden Linear: no BN scale exists, rank by magnitude
        return l1_scores(work, u, gen)
    for m in bns:
        total += work.get_submodule(m).weight.detach()[unit_range(work, u, m)].abs()
    return total


def random_scores(work: nn.Module, u: Unit, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(u.width, generator=gen).to(next(work.parameters()).device)


def uniform_scores(work: nn.Module, u: Unit, gen: torch.Generator) -> torch.Tensor:
    # keep the first channels
    return -torch.arange(u.width, dtype=torch.float32, device=next(work.parameters()).device)


def ranking(scores: Callable[[nn.Module, Unit, torch.Generator], torch.Tensor]):
    """A criterion that keeps each unit's top-scored channels (no re-fit)."""

    def select(run: SelectionRun) -> list[UnitReport]:
        reports = []
        for i, u in enumerate(run.units):
            width = u.width
            k = run.widths.get(u.name, width)
            # a grouped conv carrying the unit keeps whole groups: rank groups by their channels' total
            group_scores = scores(run.work, u, run.gen).reshape(-1, u.atom).sum(1)
            top = torch.argsort(group_scores, descending=True, stable=True)[: -(-k // u.atom)].tolist()
            order = channels_of(top, u.atom)
            if k < width:
                slim_unit(run.work, u, sorted(order))
            reports.append(
                UnitReport(u.name, u.kind, width, k, [int(j) for j in order], None, list(u.consumers))
            )
            if run.progress:
                run.progress(u.name, i + 1, len(run.units))
        return reports

    return select


# ---------------------------------------------------------------------------------------
