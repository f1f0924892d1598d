"""The planning pass of the greedy criterion: one pass of the original network over the
calibration images gives every unit's error-vs-width curve (for the budget allocation) and
keeps the original network's sampled consumer outputs (the re-fit targets), so the walk over
the pruned network that follows never runs the original network again."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from gslim.compress.calibrate import (
    Hooks,
    Sample,
    StatsAccumulator,
    batch_targets,
    consumer_rows,
    conv_output_shape,
    kernel_group,
    regression_weights,
    row_count,
    row_fraction,
    rows_per_image,
    sampling,
    target_rows,
    unit_columns,
)
from gslim.compress.dense_stats import supports_dense
from gslim.compress.omp import coarsen, greedy_select, path_dtype, per_channel_curve, prediction_error_curve
from gslim.compress.selection import PLANNING_FLOOR
from gslim.compress.shard import SINGLE, Shard
from gslim.compress.slim import column_offset
from gslim.compress.units import Unit, UnitGraph
from gslim.recipe import CompressConfig

# The kept targets may take at most this many bytes; past it they are dropped and the walk
# runs the original network instead (the same result, one more pass).
TARGET_STORE_BYTES = 2 << 30

# The curves only allocate the budget, so their greedy path takes block steps of a sixteenth of
# the width chosen so far (the walk's selection stays one channel at a time). Same statistics,
# one thread, 64 images at 112 px, random weights (`python benchmarks/planning_blocks.py`): the
# planning OMP of MobileNetV2 2.8 -> 0.6 s in 5.5x fewer steps (on a GPU, that many fewer small
# kernels), curves within 0.5% (relative) of the exact path; 1/8 saved a little more and moved
# one trained ResNet-18's 50% allocation enough to cost 0.24 points one-shot (1/16: none).
PLANNING_BLOCK_SHARE = 1 / 16

#: A consumer's planning targets come from its sampled input rows where that product costs at
#: most this many multiply-adds per element of its output map (:func:`targets_from_rows`).
#: Two threads, ResNet-50's layer1 1x1 consumer (64 -> 256 channels, 56 x 56, batch 64): its
#: BatchNorm pass ~16 ms, i.e. ~0.3 ns an element, against ~0.008 ns a multiply-add of the rows'
#: product, so 16 keeps the product under half of the pass it saves.
ROWS_TARGET_MACS_PER_ELEMENT = 16


def max_rows(cfg: CompressConfig, mod: nn.Module, channels: int) -> int:
    # enough positions for a well-posed fit (16 per unknown), capped for speed
    return min(cfg.max_positions, max(16 * channels * kernel_group(mod), 4096))


class TargetStore:
    """The original network's output rows at each reader of each unit, per batch, with the
    sample (rows, held-out mask) they were taken at: what the selection fits each consumer to.

    Readers are keyed by (unit, layer). ``complete`` is False once the byte cap was passed
    (everything is dropped then: a walk cannot use part of it)."""

    def __init__(self, cap_bytes: Optional[int] = None):
        self.cap = TARGET_STORE_BYTES if cap_bytes is None else cap_bytes
        self.rows: dict[tuple[str, str], list[tuple[Sample, torch.Tensor]]] = {}
        self.bytes = 0
        self.complete = True

    def add(self, key: tuple[str, str], sample: Sample, Y: torch.Tensor) -> None:
        if not self.complete:
            return
        self.bytes += Y.numel() * Y.element_size()
        if self.bytes > self.cap:
            self.complete, self.rows = False, {}
            return
        self.rows.setdefault(key, []).append((sample, Y))

    def get(self, key: tuple[str, str]) -> Optional[list[tuple[Sample, torch.Tensor]]]:
        return self.rows.get(key) if self.complete else None

    def release(self, unit: str) -> None:
        """Free a unit's rows (its selection is done)."""
        for key in [k for k in self.rows if k[0] == unit]:
            del self.rows[key]


def planning_curves(
    original: nn.Module,
    graph: UnitGraph,
    units: list[Unit],
    batches: list[torch.Tensor],
    cfg: CompressConfig,
    gen: torch.Generator,
    shard: Shard = SINGLE,
    store: Optional[TargetStore] = None,
) -> dict[str, list[float]]:
    """Per-unit error-vs-width curves on the original network, from one pass over the data.

    They only allocate the budget across units; the channels themselves are chosen afterwards
    on the progressively pruned network. The in-sample greedy path is corrected to an estimate
    of the error on new rows (:func:`prediction_error_curve`), so a unit with few rows per
    unknown does not look free to cut. With ``store``, the same pass keeps the target rows of
    every unit's consumers and SE squeeze convs (``pointwise_readers``) for the selection.
    """
    mods = dict(original.named_modules())
    accs: dict[tuple[str, str], StatsAccumulator] = {}
    captured: dict[tuple[str, str], torch.Tensor] = {}
    n_images = shard.images(batches)

    def sampler(
        key: tuple[str, str],
        m: nn.Module,
        x: torch.Tensor,
        out_shape: torch.Size,
        width: int,
        dense_ok: bool,
        cross: Callable[[], Optional[torch.Tensor]] = lambda: None,
    ) -> StatsAccumulator:
        if key not in accs:  # the held-out share is drawn as the selection will use it
            frac, dense = sampling(m, x.shape, out_shape, n_images, max_rows(cfg, m, width), dense_ok)
            rows = n_images * rows_per_image(m, out_shape) * (1.0 if dense else frac)
            weights = cross() if cross_from_gram(width * kernel_group(m), rows) else None
            accs[key] = StatsAccumulator(frac, gen, shard=shard, dense=dense, cross_weights=weights)
        return accs[key]

    def from_output(m: nn.Module, out: torch.Tensor, c: str, u: Unit) -> None:
        key = (u.name, c)
        x = captured.pop(key)
        # (a unit read inside a concatenation fits its own columns: sampled rows)
        weights = lambda: own_weights(m, u, c, original)  # noqa: E731 - (on the first batch only)
        acc = sampler(key, m, x, out.shape, u.width, c not in u.concat_before, weights)
        # taken inside the hook: an in-place op after the consumer cannot reach it
        sample = acc.draw(row_count(m, out), out.shape[0])
        Y = batch_targets(m, out, sample)
        if store is not None:
            store.add(key, sample, Y)
        if sample.pick is None:
            acc.add_dense(m, x, Y, None)  # the curve fits on every row
            return
        X = consumer_rows(m, x, sample.pick)
        X, Yu = unit_columns(m, u, c, original, X, Y, u.width)
        acc.add(X, Yu, None)  # the curve fits on every sampled row

    def from_rows(m: nn.Module, x: torch.Tensor, c: str, u: Unit) -> None:
        key, out_shape = (u.name, c), conv_output_shape(m, x.shape)
        acc = sampler(key, m, x, out_shape, u.width, False, lambda: own_weights(m, u, c, original))
        sample = acc.draw(math.prod(out_shape) // out_shape[1], out_shape[0])
        X = consumer_rows(m, x, sample.pick)
        Y = X @ m.weight.detach().reshape(m.weight.shape[0], -1).T.to(X.dtype)  # (a new tensor)
        if store is not None:
            store.add(key, sample, Y)
        acc.add(X, Y, None)

    rows_route: dict[tuple[str, str], bool] = {}  # decided at the first batch
    with Hooks() as hooks:
        for u in units:
            for c in u.consumers:

                def pre(m, args, c=c, u=u):  # (a layer on a concatenation reads several units)
                    key = (u.name, c)
                    if key not in rows_route:
                        rows_route[key] = targets_from_rows(m, u, c, args[0].shape, n_images, cfg)
                        if not rows_route[key]:  # (this call sees it: hooks run after the forward)
                            hooks.post(m, lambda m, args, out, c=c, u=u: from_output(m, out, c, u))
                    if rows_route[key]:
                        from_rows(m, args[0], c, u)
                    else:
                        captured[key] = args[0]

                hooks.pre(mods[c], pre)
            if store is None:
                continue
            for c in pointwise_readers(u, mods):

                def keep(m, args, out, c=c, u=u):
                    sample = sampler((u.name, c), m, args[0], out.shape, u.width, False).draw(
                        row_count(m, out)
                    )
                    store.add((u.name, c), sample, target_rows(m, out, sample.pick))

                hooks.post(mods[c], keep)
        with torch.no_grad():
            for x in batches:
                original(x)
    return _curves(units, accs, mods, cfg)


def _curves(
    units: list[Unit],
    accs: dict[tuple[str, str], StatsAccumulator],
    mods: dict[str, nn.Module],
    cfg: CompressConfig,
) -> dict[str, list[float]]:
    """Each unit's error-vs-width curve from its consumers' summed statistics."""
    curves = {}
    for u in units:
        # (popped: a unit's sums are let go once its curve exists, not held to the last unit's)
        stats = [coarsen(accs.pop((u.name, c)).result(kernel_group(mods[c])), u.atom) for c in u.consumers]
        # the curve only needs to resolve errors down to ~1e-3: below that a unit is as good as whole
        _, path = greedy_select(
            stats,
            eps=PLANNING_FLOOR,
            ridge=cfg.ridge,
            block_share=PLANNING_BLOCK_SHARE,
            dtype=path_dtype(cfg.omp_precision, cfg.ridge),
        )
        curve = prediction_error_curve(path, min(st.rows for st in stats), stats[0].group)
        curves[u.name] = per_channel_curve(curve, u.atom)
    return curves


def targets_from_rows(
    m: nn.Module, u: Unit, c: str, x_shape: torch.Size, n_images: int, cfg: CompressConfig
) -> bool:
    """Whether consumer ``c``'s planning targets are computed from its sampled input rows (Y = X W:
    its own output less its bias, to float rounding) instead of read from its output. No hook
    then reads the output, so the consumer's BatchNorm folds into it for the pass
    (:mod:`gslim.compress.fast_passes`), which skips an elementwise pass over the map. Taken
    where the rows' product costs at most :data:`ROWS_TARGET_MACS_PER_ELEMENT` multiply-adds per
    element of the output map: a plain conv (groups 1) that reads the unit alone and never takes
    dense statistics (1 x 1, strided), on a map so large that few of its rows are sampled.
    Decided from one image's shapes and the whole set's size: the same on every rank."""
    if type(m) is not nn.Conv2d or m.groups != 1 or supports_dense(m) or c in u.concat_before:
        return False
    fraction = row_fraction(m, conv_output_shape(m, x_shape), n_images, max_rows(cfg, m, u.width))
    return fraction * m.weight[0].numel() <= ROWS_TARGET_MACS_PER_ELEMENT


def cross_from_gram(columns: int, rows: float) -> bool:
    """Whether the planning pass forms a consumer's B as G W once (an F x F x O product in
    float64) rather than summing each batch's X^T Y (rows x F x O in float32, about half a
    float64 term's time): where the rows are at least twice the columns. A wide layer at a small
    resolution has far fewer (wide_resnet50_2 at 64 px, 48 images: 192 rows for a 3 x 3
    consumer's 9,216 columns and 1,024 outputs; two threads, its G W 0.9 s, the rows' X^T Y
    0.03 s)."""
    return rows >= 2 * columns


def own_weights(m: nn.Module, u: Unit, c: str, model: nn.Module) -> Optional[torch.Tensor]:
    """The consumer ``c``'s weights on ``u``'s columns in the regression layout (F x O, float64):
    on the planning pass its target is its own output less the bias, so Y = X W on every row and
    the sums form B from G (:class:`StatsAccumulator`'s ``cross_weights``). None for a grouped
    conv, whose rows do not carry its block-diagonal weights."""
    if not isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, nn.Conv2d) and m.groups != 1):
        return None
    if c in u.concat_before:  # (unit_columns: the target less the other inputs' share)
        return regression_weights(m, range(u.width), column_offset(model, u, c))
    return regression_weights(m, range(m.weight.shape[1]))


def pointwise_readers(u: Unit, mods: dict[str, nn.Module]) -> list[str]:
    """The 1x1 convs (or Linears) inside ``u`` that read its channels: an SE block's squeeze."""
    return [c for c in u.inner_readers if _is_pointwise(mods[c])]


def _is_pointwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (
        isinstance(mod, nn.Conv2d) and kernel_group(mod) == 1 and mod.groups == 1
    )
