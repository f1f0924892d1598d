"""Channel selection criteria and the compression driver.

Criteria (one interface, same units, same surgery):

* ``greedy`` — greedy optimization (Ye, Wu & Liu, NeurIPS 2020): units are processed
  from input to output; each starts from the empty set and adds the channel that most
  lowers the squared discrepancy between its consumer's output and the *original*
  network's, with the consumer re-fitted by ridge least squares after every addition
  (:mod:`gslim.compress.omp`). Features come from the network pruned so far, targets
  from the original network, so errors do not accumulate.
* ``greedy-loss`` — greedy forward selection (Ye et al., ICML 2020): add the channel
  that most lowers the network's loss on a calibration mini-batch. The block input is
  cached, only the rest of the network runs, and candidates are scored many per forward.
  As published, each step scores 50 random candidates (``loss_candidates``; null: a
  "stochastic greedy" sample of (C/k) ln(1/delta), Mirzasoleiman et al., AAAI 2015) with
  the selected channels scaled by N/|S|, the paper's Frank-Wolfe step (``loss_rescale``).
* ``l1`` (filter magnitude), ``bn`` (BatchNorm |gamma|), ``random`` and ``uniform`` (keep
  the first channels, i.e. a narrower network) — baselines without re-fitting.

Widths come from eps (greedy: per unit, the fewest channels with relative error <= eps),
or from a MACs, params or latency budget: greedy spends it by a knapsack over error curves
measured on the original network (the least total error within the budget; ``allocation: eps``
searches one eps for all units instead), the others by one uniform keep ratio.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from gslim.compress import budget as budget_mod
from gslim.compress.bn_recalib import recalibrate_bn_checked
from gslim.compress.calibrate import split_batches
from gslim.compress.fast_passes import foldable_pairs, folded_batchnorm, statistics_layout
from gslim.compress.greedy import run_greedy, walk_cut_layers
from gslim.compress.greedy_loss import run_greedy_loss
from gslim.compress.planning import TargetStore, planning_curves
from gslim.compress.ranking import bn_scores, l1_scores, random_scores, ranking, uniform_scores
from gslim.compress.selection import Criterion, Progress, SelectionRun, UnitReport
from gslim.compress.shard import Shard
from gslim.compress.units import Unit, UnitGraph, find_units
from gslim.errors import GslimError
from gslim.recipe import CompressConfig

__all__ = ["CRITERIA", "CompressionResult", "Criterion", "SelectionRun", "UnitReport", "compress_model"]


@dataclass
class CompressionResult:
    model: nn.Module
    widths: dict[str, int]  # unit name -> kept width, for every unit that was narrowed
    units: list[UnitReport]
    skipped: list[tuple[str, str]]
    criterion: str
    eps: Optional[float]
    keep_ratio: Optional[float]
    budget: Optional[dict]
    seconds: float
    calib_images: int
    curves: Optional[dict[str, list[float]]] = None  # the planning curves (reusable by a later round)
    bn_recalib: Optional[dict] = None  # the BatchNorm re-calibration's check (None: not asked for)

    def to_json(self) -> dict:
        return {
            "criterion": self.criterion,
            "eps": self.eps,
            "keep_ratio": self.keep_ratio,
            "budget": self.budget,
            "seconds": round(self.seconds, 3),
            "calib_images": self.calib_images,
            "bn_recalib": self.bn_recalib,
            "widths": self.widths,
            "units": [asdict(u) for u in self.units],
            "left_alone": [{"channels": d, "reason": r} for d, r in self.skipped],
        }


@contextlib.contextmanager
def exact_matmuls(device: torch.device):
    """TF32 off on CUDA while the statistics and fits are computed: its 10-bit mantissa would
    round the Grams' float32 products (and the convolutions that make the features) far below
    what the float64 sums keep. The latency timings inside restore the deployment's defaults
    (gslim.compress.latency_table.deployment_matmuls)."""
    if device.type != "cuda":  # (no import of gslim.runtime on a CPU: 0.13 s of a selection's first call)
        yield
        return
    from gslim.runtime.cuda import tf32

    with tf32(matmul=False, cudnn=False):
        yield


def _without_tf32(fn):
    """Runs ``fn(model, input_size, calib_x, ...)`` under :func:`exact_matmuls` for calib_x's device."""

    @functools.wraps(fn)
    def wrapped(model: nn.Module, input_size: int, calib_x: torch.Tensor, *args, **kwargs):
        with exact_matmuls(calib_x.device):
            return fn(model, input_size, calib_x, *args, **kwargs)

    return wrapped


@_without_tf32
def compress_model(
    model: nn.Module,
    input_size: int,
    calib_x: torch.Tensor,
    calib_y: Optional[torch.Tensor],
    cfg: CompressConfig,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: Progress = None,
    latency: Optional["LatencyRequest"] = None,  # noqa: F821 - gslim.compress.latency, imported lazily
    curves: Optional[dict[str, list[float]]] = None,
    shard: Optional[Shard] = None,
) -> CompressionResult:
    """Select channels with ``cfg.criterion`` and return a physically slimmed copy of ``model``.

    A latency budget (``cfg.target_latency``) needs ``latency``: where to measure and the target
    in predicted milliseconds (:func:`gslim.compress.stage.compress_stage` runs the closed loop
    around this). ``curves`` are planning curves of an earlier call on the same model and
    calibration images (they are not measured again). ``shard`` (:mod:`gslim.compress.shard`): under
    torchrun each rank passes the same ``calib_x`` and runs its share of the batches; the
    statistics are summed across ranks, so every rank returns the same model.
    """
    t0 = time.perf_counter()
    criterion = CRITERIA.get(cfg.criterion)
    if criterion is None:
        raise GslimError(f"unknown criterion {cfg.criterion!r}; choose one of {', '.join(CRITERIA)}")
    if cfg.eps is not None and not criterion.plans_from_curves:
        raise GslimError("compress.eps applies to the greedy criterion; use target_macs/target_params")
    if criterion.needs_labels and calib_y is None:
        raise GslimError(f"{criterion.name} needs labelled calibration images")
    seed = cfg.seed if cfg.seed is not None else seed
    gen = torch.Generator().manual_seed(seed)
    original = model.eval()
    work = copy.deepcopy(model).eval()
    shard = shard or Shard()
    if shard.enabled and criterion.name == "greedy-loss":
        raise GslimError("greedy-loss does not run across torchrun ranks; run it in one process")
    graph = find_units(work, input_size, include_residual=cfg.prune_residual)
    units = graph.units
    if not units:
        raise GslimError("found no prunable channel groups in this model")
    folds: list[tuple[str, str]] = []
    if criterion.plans_from_curves:  # (greedy: the passes' network time, fast_passes)
        calib_x = statistics_layout(calib_x)
        # (not across a cut of the walk: a conv's folded output would reach its BatchNorm as a copy)
        cut_after = walk_cut_layers(graph)
        folds = [p for p in foldable_pairs(graph.traced) if p[0] not in cut_after]
    batches = shard.mine(split_batches(calib_x, batch_size))
    full = {u.name: u.width for u in units}

    widths: Optional[dict[str, int]] = None
    eps, ratio, budget_info = cfg.eps, None, None
    targets: Optional[TargetStore] = None
    if cfg.eps is None:
        cost = budget_mod.CostModel(work, graph, input_size, units)
        budget, lat_model = _budget(cfg, cost, latency, work, graph, units, input_size)
        allocation = cfg.allocation or "knapsack"  # measured better than eps: benchmarks/allocation.py
        if criterion.plans_from_curves:
            if curves is None:  # one pass: the curves, and the targets the selection fits to
                targets = TargetStore()
                with folded_batchnorm((original, work), folds):
                    curves = planning_curves(original, graph, units, batches, cfg, gen, shard, targets)
            if allocation == "knapsack":
                weight = cfg.latency.macs_weight if budget.metric == "latency" else 0.0
                widths = budget_mod.knapsack_widths(
                    cost, budget, curves, cfg.round_to, cfg.min_width, macs_weight=weight
                )
                eps = None
            else:
                eps, widths = budget_mod.eps_widths(cost, budget, curves, cfg.round_to, cfg.min_width)
        else:
            allocation = "uniform"
            ratio, widths = budget_mod.uniform_widths(cost, budget, cfg.round_to, cfg.min_width)
        base = budget.measure(cost, cost.full)
        budget_info = {
            "metric": budget.metric,
            "target": budget.target,
            "target_fraction": budget.target / base,
            "planned": (planned := budget.measure(cost, widths)),
            "planned_fraction": planned / base,
            "allocation": allocation,
        }
        if lat_model is not None:
            budget_info["latency"] = {
                "predicted_ms": lat_model.predict(widths),
                "full_ms": lat_model.full_ms,
                "macs_weight": cfg.latency.macs_weight if allocation == "knapsack" else None,
                "model": lat_model.describe(),
            }

    run = SelectionRun(
        original, work, graph, units, batches, calib_y, cfg, widths, gen, progress, shard, targets
    )
    with folded_batchnorm((original, work), folds):
        reports = criterion.select(run)
    del run, targets  # (the kept targets can be large)

    bn_recalib = recalibrate_bn_checked(original, work, batches, shard) if cfg.bn_recalib else None
    narrowed = {u.name: u.width for u in units if u.width < full[u.name]}
    return CompressionResult(
        model=work.eval(),
        widths=narrowed,
        units=reports,
        skipped=graph.skipped,
        criterion=criterion.name,
        eps=eps,
        keep_ratio=ratio,
        budget=budget_info,
        seconds=time.perf_counter() - t0,
        calib_images=int(calib_x.shape[0]),
        curves=curves,
        bn_recalib=bn_recalib,
    )


def _budget(
    cfg: CompressConfig,
    cost: "budget_mod.CostModel",
    latency,
    work: nn.Module,
    graph: UnitGraph,
    units: list[Unit],
    input_size: int,
):
    """The budget to plan against (and the latency model behind a latency budget)."""
    if cfg.target_latency is None:
        return budget_mod.resolve_budget(cost, cfg.target_macs, cfg.target_params), None
    if latency is None:
        raise GslimError(
            "a latency budget needs a latency backend to measure on: compress with "
            "gslim.compress.stage.compress_stage (gslim compress), which sets one up"
        )
    model = latency.model_for(work, graph, units, input_size, cfg.round_to, cfg.min_width)
    return budget_mod.Budget("latency", latency.target_ms, model.predict, model.predict_moves), model


# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# the registry of criteria


def _greedy(run: SelectionRun) -> list[UnitReport]:
    return run_greedy(
        run.original,
        run.work,
        run.graph,
        run.units,
        run.batches,
        run.cfg,
        run.widths,
        run.gen,
        run.progress,
        run.shard,
        run.targets,
    )


def _greedy_loss(run: SelectionRun) -> list[UnitReport]:
    return run_greedy_loss(
        run.work, run.graph, run.units, run.batches, run.labels, run.cfg, run.widths, run.gen, run.progress
    )


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion(
            "greedy",
            _greedy,
            plans_from_curves=True,
            description="forward selection of channels that reconstruct each consumer's output, with re-fit",
        ),
        Criterion(
            "greedy-loss",
            _greedy_loss,
            needs_labels=True,
            description="forward selection that minimises the training loss (Ye et al., ICML 2020)",
        ),
        Criterion("l1", ranking(l1_scores), description="largest filter L1 norms"),
        Criterion("bn", ranking(bn_scores), description="largest BatchNorm scales"),
        Criterion("random", ranking(random_scores), description="random channels (a control)"),
        Criterion("uniform", ranking(uniform_scores), description="the first channels (a control)"),
    )
}
