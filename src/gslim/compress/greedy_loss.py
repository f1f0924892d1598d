"""The ``greedy-loss`` criterion (Ye et al., ICML 2020): add the channel that most lowers the
network's loss on a calibration mini-batch.

As in the paper and its code (github.com/lushleaf/Network-Pruning-Greedy-Forward-Selection,
``models/mobilenet_v2.py`` ``Mask`` and ``mobile2_prune.py`` ``decide_candidate``): the layer's
output is its width N times a convex combination of its neurons, grown by Frank-Wolfe steps of
size 1/(n+1), so after n additions each selected channel is scaled by N/n (``loss_rescale``);
each step scores 50 random candidates (``loss_candidates``) on a fresh random mini-batch and
keeps the one with the lowest loss. What gslim keeps different, and why: the number of channels
per unit comes from the budget (the same uniform widths as the other baselines, so that every
method is compared at equal MACs) instead of growing each layer until a training-accuracy
tolerance is met; and there is no fine-tune between layers (the same fine-tune follows every
criterion)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gslim.compress.calibrate import (
    Hooks,
    Segment,
)
from gslim.compress.greedy import segments_for
from gslim.compress.omp import channels_of
from gslim.compress.selection import Progress, UnitReport
from gslim.compress.slim import slim_unit, unit_range
from gslim.compress.units import Unit, UnitGraph
from gslim.errors import GslimError
from gslim.recipe import CompressConfig

# greedy-loss (ICML 2020): forward selection on the network's loss


def run_greedy_loss(
    work: nn.Module,
    graph: UnitGraph,
    units: list[Unit],
    batches: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: CompressConfig,
    widths: dict[str, int],
    gen: torch.Generator,
    progress: Progress,
) -> list[UnitReport]:
    if any(u.kind == "residual" for u in units):
        raise GslimError(
            "greedy-loss selects block-internal channels only; set compress.prune_residual: false"
        )
    segs = segments_for(graph, units, work)
    wmods = dict(work.named_modules())
    by_segment: dict[int, list[Unit]] = {}
    for u in units:
        end = max(graph.node_index[graph.consumer_node[c]] for c in u.consumers)
        s = next(i for i, seg in enumerate(segs) if seg.start < end <= seg.end)
        by_segment.setdefault(s, []).append(u)
    reports, done = [], 0
    # every calibration image's activation at the current segment input: each greedy step
    # scores its candidates on a fresh mini-batch drawn from them, as the ICML algorithm does
    # (a fixed mini-batch would be fitted, not generalised from)
    act = torch.cat(batches)
    with torch.no_grad():
        for s, seg in enumerate(segs):
            for u in sorted(by_segment.get(s, []), key=lambda u: u.order):
                width = u.width
                k = widths.get(u.name, width)
                if k < width:
                    order = _loss_forward_selection(u, k, act, labels, segs[s:], wmods, cfg, gen)
                    slim_unit(work, u, sorted(order))
                    if cfg.loss_rescale:
                        _scale_readers(work, u, width / len(order))
                else:
                    order = list(range(width))
                reports.append(
                    UnitReport(
                        u.name, u.kind, width, len(order), [int(i) for i in order], None, list(u.consumers)
                    )
                )
                done += 1
                if progress:
                    progress(u.name, done, len(units))
            act = torch.cat([seg.module(a) for a in act.split(256)])
    return reports


def _loss_forward_selection(
    u: Unit,
    k: int,
    x: torch.Tensor,
    y: torch.Tensor,
    rest: list[Segment],
    wmods: dict[str, nn.Module],
    cfg: CompressConfig,
    gen: torch.Generator,
) -> list[int]:
    C, a = u.width, u.atom  # candidates are whole groups of ``a`` channels (1: single channels)
    n_groups, k = C // a, -(-k // a)
    selected: list[int] = []
    mask_state = {"masks": None}

    def masked_input(m, args, span: slice):
        masks = mask_state["masks"].repeat_interleave(a, dim=1)  # (n_cand, C)
        inp = args[0]
        nc = masks.shape[0]
        if inp.shape[1] != C:  # the unit's range of a concatenation: the other channels stay
            full = masks.new_ones(nc, inp.shape[1])
            full[:, span] = masks
            masks = full
        shaped = inp.view(nc, -1, *inp.shape[1:])
        view = [nc, 1, inp.shape[1]] + [1] * (inp.dim() - 2)
        return (shaped * masks.view(view)).view_as(inp)

    sample = cfg.loss_candidates or max(1, math.ceil(n_groups / k * math.log(100.0)))
    batch = min(cfg.loss_batch, x.shape[0])
    # candidates scored in one batched forward, sized by the activation they replicate
    # (~32M floats of segment input: 64 candidates at 32 px, 1 at 224 px instead of gigabytes)
    per_forward = max(1, min(4096 // batch, (1 << 25) // max(1, batch * x[0].numel())))
    x_all, y_all = x, y
    with Hooks() as hooks:
        for c in u.readers:
            span = unit_range(wmods[""], u, c)  # (named_modules: "" is the model)
            hooks.pre(wmods[c], lambda m, args, span=span: masked_input(m, args, span))
        base = torch.zeros(n_groups, device=x.device)  # the masks multiply activations on their device
        while len(selected) < k:
            pick = torch.randperm(x_all.shape[0], generator=gen)[:batch]
            x, y = x_all[pick], y_all[pick]
            remaining = torch.tensor([j for j in range(n_groups) if j not in set(selected)])
            if sample < remaining.numel():
                remaining = remaining[torch.randperm(remaining.numel(), generator=gen)[:sample]]
            best_j, best_loss = None, float("inf")
            # the Frank-Wolfe step: n+1 selected groups, each at N/(n+1) (1 with 0/1 masks)
            value = n_groups / (len(selected) + 1) if cfg.loss_rescale else 1.0
            for chunk in remaining.split(per_forward):
                masks = base.repeat(chunk.numel(), 1)
                masks[torch.arange(chunk.numel(), device=masks.device), chunk.to(masks.device)] = 1.0
                masks *= value
                mask_state["masks"] = masks
                h = x.repeat(chunk.numel(), *[1] * (x.dim() - 1))
                for seg in rest:
                    h = seg.module(h)
                losses = F.cross_entropy(h, y.repeat(chunk.numel()), reduction="none").view(chunk.numel(), -1)
                mean = losses.mean(1)
                i = int(torch.argmin(mean))
                if float(mean[i]) < best_loss:
                    best_loss, best_j = float(mean[i]), int(chunk[i])
            selected.append(best_j)
            base[best_j] = 1.0
    return channels_of(selected, a)


def _scale_readers(work: nn.Module, u: Unit, scale: float) -> None:
    """Fold the kept channels' scale into every layer that reads them (their input columns)."""
    for c in u.readers:
        mod = work.get_submodule(c)
        mod.weight.data[:, unit_range(work, u, c)] *= scale
