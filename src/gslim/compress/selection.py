"""What every selection criterion shares: its input (:class:`SelectionRun`), its per-unit
report (:class:`UnitReport`) and its registry entry (:class:`Criterion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from gslim.compress.shard import Shard
from gslim.compress.units import Unit, UnitGraph
from gslim.recipe import CompressConfig

PLANNING_FLOOR = 1e-3
Progress = Optional[Callable[[str, int, int], None]]  # (unit name, done, total)


@dataclass
class UnitReport:
    name: str
    kind: str
    width: int
    kept: int
    order: list[int]  # kept channel indices, in the order they were selected (greedy) or ranked
    rel_error: Optional[float] = None  # consumer discrepancy after selection + re-fit, on held-out rows
    consumers: list[str] = field(default_factory=list)
    fit_error: Optional[float] = None  # the same on the rows the re-fit was computed from
    consumer_errors: dict[str, float] = field(default_factory=dict)  # held-out, per consumer
    refit: Optional[str] = None  # "least-squares", "original" (slicing beat the re-fit held out) or "mixed"
    warnings: list[str] = field(default_factory=list)


# the registry of criteria


@dataclass
class SelectionRun:
    """What a criterion's ``select`` gets: the original and the working (slimmed in place) model,
    the units, the calibration batches (and labels), the recipe section, the planned widths
    (None with an eps budget), the RNG and the progress callback."""

    original: nn.Module
    work: nn.Module
    graph: UnitGraph
    units: list[Unit]
    batches: list[torch.Tensor]
    labels: Optional[torch.Tensor]
    cfg: CompressConfig
    widths: Optional[dict[str, int]]
    gen: torch.Generator
    progress: Progress
    shard: Shard = field(default_factory=Shard)  # this torchrun rank's part of the calibration set
    targets: Optional["TargetStore"] = None  # the original network's outputs kept by planning  # noqa: F821


@dataclass(frozen=True)
class Criterion:
    name: str
    select: Callable[[SelectionRun], list[UnitReport]]
    plans_from_curves: bool = False  # per-unit widths from measured error curves (else uniform widths)
    needs_labels: bool = False
    description: str = ""
