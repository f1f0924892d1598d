"""The ``greedy`` criterion: per unit, forward selection of the channels that best reconstruct
each consumer's output (OMP in Gram space, :mod:`gslim.compress.omp`), with the consumer
re-fitted by ridge least squares to the *original* network's outputs. The planning pass (the
curves that turn a budget into widths, and the kept targets) is :mod:`gslim.compress.planning`."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from gslim.compress import budget as budget_mod
from gslim.compress.calibrate import (
    Hooks,
    Segment,
    StatsAccumulator,
    batch_targets,
    build_segments,
    consumer_rows,
    cut_points,
    kernel_group,
    regression_weights,
    row_count,
    sampling,
    unit_columns,
    unit_span,
)
from gslim.compress.fast_passes import reuse_add_operands
from gslim.compress.omp import Stats, channels_of, coarsen, greedy_select, path_dtype, refit, subset_error
from gslim.compress.planning import TargetStore, max_rows, pointwise_readers
from gslim.compress.segment_walk import SegmentWalk
from gslim.compress.selection import Progress, UnitReport
from gslim.compress.shard import SINGLE, Shard
from gslim.compress.slim import column_offset, slim_unit
from gslim.compress.sums import held_error
from gslim.compress.units import Unit, UnitGraph
from gslim.recipe import CompressConfig

# greedy (OMP with re-fit)


# Below this many fitted rows per unknown (a consumer's kept channels times its kernel
# positions) a least-squares re-fit is under-determined: in-sample it reads ~0, held out it
# does not. The unit's report carries a warning; the held-out error decides what is kept.
MIN_ROWS_PER_UNKNOWN = 2.0


def walk_cut_layers(graph: UnitGraph) -> set[str]:
    """The layers after which the walk ends a segment (:func:`segments_for` with ``merge_idle``,
    over the internal units, as :func:`run_greedy` cuts): a value there is carried to the next
    segment in a list, batch by batch."""
    cuts = _walk_cuts(graph, [u for u in graph.units if u.kind == "internal"], merge_idle=True)
    nodes = list(graph.traced.graph.nodes)
    return {str(nodes[i].target) for i in cuts if nodes[i].op == "call_module"}


def _walk_cuts(graph: UnitGraph, units: list[Unit], merge_idle: bool) -> list[int]:
    spans = [unit_span(u, graph.node_index, graph.consumer_node) for u in units]
    cuts = cut_points(graph.traced, spans)
    if merge_idle and cuts:
        merged = [cuts[0]]
        for c in cuts[1:]:
            if any(merged[-1] < end <= c for _, end in spans):  # the segment up to c holds a consumer
                merged.append(c)
        cuts = merged
    return cuts


def segments_for(
    graph: UnitGraph, units: list[Unit], root: nn.Module, merge_idle: bool = False, reuse_adds: bool = False
) -> list[Segment]:
    """The network cut between units. With ``merge_idle`` (the greedy walk), a stretch that no
    unit's consumer ends in is not a segment of its own but part of the next one: the walk keeps
    every image's activations at each cut, and a cut between the stem's layers (a ResNet's conv,
    BatchNorm, ReLU and max-pool are each one) made it keep, and fault into fresh memory, four
    whole-set copies of a 112 x 112 map (ResNet-18, 224 px, 256 images: 1.9 s of a 3.5 s pass).
    With ``reuse_adds`` (the pruned network's segments: no hook keeps an output of theirs), residual
    sums are written into the output they add (:func:`fast_passes.reuse_add_operands`)."""
    segments = build_segments(graph.traced, _walk_cuts(graph, units, merge_idle), root)
    if reuse_adds:
        for seg in segments:
            reuse_add_operands(seg.module)
    return segments


class _Selection:
    """Bookkeeping shared by the units of one greedy run."""

    def __init__(
        self,
        original: nn.Module,
        work: nn.Module,
        cfg: CompressConfig,
        gen: torch.Generator,
        n_images: int,
        shard: Shard,
        targets: Optional[TargetStore] = None,
    ):
        self.omods, self.wmods = dict(original.named_modules()), dict(work.named_modules())
        self.work, self.cfg, self.gen, self.n_images, self.shard = work, cfg, gen, n_images, shard
        # the original network's outputs kept from the planning pass (None: run it again)
        self.targets = targets if targets is not None and targets.complete else None
        # original output channels that each sliced producer still has: a consumer whose rows
        # an earlier unit cut is fitted to the matching rows of the original output
        self.kept_rows: dict[str, torch.Tensor] = {}

    def hooks(
        self,
        hooks: Hooks,
        u: Unit,
        readers: list[str],
        accs: dict[str, StatsAccumulator],
        const: frozenset[str] = frozenset(),
    ) -> None:
        """Hooks that fill ``accs[reader]``: targets from the original network's reader (run
        first on each batch, or kept from the planning pass), features from the pruned
        network's (run second), the same rows sampled from both. Readers in ``const`` get a
        constant column (an intercept)."""
        pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kept = {}
        for c in readers:
            if self.targets is not None and (rows := self.targets.get((u.name, c))) is not None:
                kept[c] = iter(rows)

        def post(m, args, out, c):
            if c not in accs:  # dense statistics, as the planning pass decides on the same shapes
                frac, dense = sampling(
                    m,
                    args[0].shape,
                    out.shape,
                    self.n_images,
                    max_rows(self.cfg, m, u.width),
                    c not in u.concat_before and c not in const,
                )
                # (the held-out share kept as data: a dense consumer's maps, HeldMaps, or the
                # sampled rows, HeldRows; its error is then one conv or product)
                accs[c] = StatsAccumulator(frac, self.gen, shard=self.shard, dense=dense, held_as_data=True)
            sample = accs[c].draw(row_count(m, out), out.shape[0])
            pending[c] = (sample, batch_targets(m, out, sample))

        def pre(m, args, c):
            if c in kept:
                sample, Y = next(kept[c])
                accs.setdefault(c, StatsAccumulator(1.0, self.gen, shard=self.shard, held_as_data=True))
            else:
                sample, Y = pending.pop(c)
            if c in self.kept_rows:
                Y = Y[:, self.kept_rows[c].to(Y.device)]
            if sample.pick is None:
                accs[c].add_dense(m, args[0], Y, sample.held)
                return
            X, Y = unit_columns(m, u, c, self.work, consumer_rows(m, args[0], sample.pick), Y, u.width)
            if c in const:
                X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], 1)
            accs[c].add(X, Y, sample.held)

        for c in readers:
            if c not in kept:
                hooks.post(self.omods[c], lambda m, a, o, c=c: post(m, a, o, c))
            hooks.pre(self.wmods[c], lambda m, a, c=c: pre(m, a, c))

    def finished(self, u: Unit) -> None:
        """``u`` is selected: its kept targets are not needed any more."""
        if self.targets is not None:
            self.targets.release(u.name)

    @property
    def needs_original(self) -> bool:
        """Whether the walk must run the original network (its targets were not kept)."""
        return self.targets is None


def run_greedy(
    original: nn.Module,
    work: nn.Module,
    graph: UnitGraph,
    units: list[Unit],
    batches: list[torch.Tensor],
    cfg: CompressConfig,
    widths: Optional[dict[str, int]],
    gen: torch.Generator,
    progress: Progress,
    shard: Shard = SINGLE,
    targets: Optional[TargetStore] = None,
) -> list[UnitReport]:
    internal = [u for u in units if u.kind == "internal"]
    residual = [u for u in units if u.kind == "residual"]
    orig_segs = segments_for(graph, internal, original, merge_idle=True)
    work_segs = segments_for(graph, internal, work, merge_idle=True, reuse_adds=True)
    by_segment: dict[int, list[Unit]] = {}
    for u in internal:
        end = max(graph.node_index[graph.consumer_node[c]] for c in u.consumers)
        s = next(i for i, seg in enumerate(work_segs) if seg.start < end <= seg.end)
        by_segment.setdefault(s, []).append(u)
    sel = _Selection(original, work, cfg, gen, shard.images(batches), shard, targets)
    reports: list[UnitReport] = []
    done = 0
    orig_act = list(batches) if sel.needs_original else None
    work_act = list(batches)
    with torch.no_grad():
        last = max(by_segment, default=-1)
        for s, (oseg, wseg) in enumerate(zip(orig_segs[: last + 1], work_segs[: last + 1])):
            seg_units = sorted(by_segment.get(s, []), key=lambda u: u.order)
            walk = SegmentWalk(oseg.module, wseg.module, orig_act, work_act, seg_units, graph)
            for u in seg_units:
                k = widths.get(u.name, u.width) if widths is not None else None
                width = u.width
                squeeze = pointwise_readers(u, sel.wmods)
                reports.append(
                    _select_unit(
                        sel,
                        u,
                        k,
                        walk.run_for(u, squeeze),
                        squeeze,
                        lambda keep, u=u, w=width: walk.unit_sliced(u, w, keep),
                    )
                )
                sel.finished(u)
                walk.unit_done(u, width, sorted(reports[-1].order))
                done += 1
                if progress:
                    progress(u.name, done, len(units))
            if s < last:  # (past the last unit's segment no activation is read)
                orig_act, work_act = walk.advance()
    if residual:

        def run_whole():
            for x in batches:
                if sel.needs_original:
                    original(x)
                work(x)

        for u in residual:
            k = widths.get(u.name, u.width) if widths is not None else None
            reports.append(_select_unit(sel, u, k, run_whole, pointwise_readers(u, sel.wmods)))
            sel.finished(u)
            done += 1
            if progress:
                progress(u.name, done, len(units))
    return reports


def _collect(
    sel: _Selection, u: Unit, readers: list[str], run: Callable[[], None], const: frozenset[str] = frozenset()
) -> dict[str, Stats]:
    accs: dict[str, StatsAccumulator] = {}
    with Hooks() as hooks:
        sel.hooks(hooks, u, readers, accs, const)
        run()
    return {c: accs[c].result(1 if c in const else kernel_group(sel.wmods[c])) for c in readers}


@torch.no_grad()
def _select_unit(
    sel: _Selection,
    u: Unit,
    k: Optional[int],
    run: Callable[[], None],
    squeeze: list[str],
    sliced: Optional[Callable[[list[int]], None]] = None,
) -> UnitReport:
    """Select ``u``'s channels on statistics from one pass of ``run``, slim it, and re-fit its
    consumers (and ``squeeze``, the SE squeeze convs that read it: :func:`pointwise_readers`) to
    the original network's outputs."""
    cfg = sel.cfg
    width = u.width
    const = frozenset(c for c in squeeze if sel.wmods[c].bias is not None)
    collected = _collect(sel, u, u.consumers + squeeze, run, const)
    stats = [collected[c] for c in u.consumers]
    if k is not None and k >= width:
        order = list(range(width))
    else:
        # whole groups of u.atom channels where a grouped conv carries the unit (1: channels)
        coarse, a = [coarsen(st, u.atom) for st in stats], u.atom
        dtype = path_dtype(cfg.omp_precision, cfg.ridge)
        groups, _ = greedy_select(
            coarse,
            k=None if k is None else -(-k // a),
            eps=cfg.eps if k is None else None,
            ridge=cfg.ridge,
            dtype=dtype,
        )
        if k is None:  # eps-driven: round the count up, adding the next greedy choices
            kr = budget_mod.round_width(
                len(groups) * a, width, budget_mod.unit_round_to(cfg.round_to, a), cfg.min_width
            )
            if kr > len(groups) * a:
                groups, _ = greedy_select(coarse, k=kr // a, ridge=cfg.ridge, dtype=dtype)
        order = channels_of(groups, a)
    # the ranks hold the same sums; rank 0's choice is everyone's, whatever the last bit of float
    order = sel.shard.from_rank0(order)
    keep = sorted(order)
    if squeeze:
        # slice everything, refit the squeeze so the gates match the original network's, then
        # fit the consumers on the gates the slim model really computes (a second pass)
        slim_unit(sel.work, u, keep, consumers=True)
        if sliced is not None:  # (the walk's second pass resumes from the squeeze, sliced)
            sliced(keep)
        for c in squeeze:
            _refit_squeeze(sel, c, collected[c], keep, c in const)
        collected = _collect(sel, u, u.consumers, run)
        stats = [collected[c] for c in u.consumers]
        fit_keep, columns = list(range(len(keep))), len(keep)
    else:
        slim_unit(sel.work, u, keep, consumers=False)
        fit_keep, columns = keep, width
    report = UnitReport(
        u.name, u.kind, width, len(keep), [int(i) for i in order], consumers=list(u.consumers)
    )
    _refit_consumers(sel, u, stats, keep, fit_keep, columns, report)
    for name in u.producers + u.gate_producers:
        prev = sel.kept_rows.get(name, torch.arange(width))
        sel.kept_rows[name] = prev[torch.as_tensor(keep, dtype=torch.long)]
    return report


def _install(mod: nn.Module, W: torch.Tensor, n_in: int, off: int, replaced: int) -> None:
    """Weights ``W`` (regression layout) for ``n_in`` input channels in place of the ``replaced``
    columns from ``off``; the other columns (inside a concatenation) stay."""
    old = mod.weight.detach()
    block = W.T.reshape(W.shape[1], n_in, *old.shape[2:]).to(old.dtype)
    block = torch.cat([old[:, :off], block, old[:, off + replaced :]], 1)
    if isinstance(mod, nn.Linear):
        mod.in_features = block.shape[1]
    else:
        mod.in_channels = block.shape[1]
    mod.weight = nn.Parameter(block.contiguous(), requires_grad=mod.weight.requires_grad)


def _refit_consumers(
    sel: _Selection,
    u: Unit,
    stats: list[Stats],
    keep: list[int],
    fit_keep: list[int],
    columns: int,
    report: UnitReport,
) -> None:
    """Least-squares consumer weights on the fitted rows; kept only where they beat the
    current weights (sliced) on the held-out rows. ``columns``: the unit's channels that the
    consumers still read."""
    cfg = sel.cfg
    fit_num = held_num = fit_den = held_den = 0.0
    kinds = set()
    for c, st in zip(u.consumers, stats):
        mod = sel.wmods[c]
        off = column_offset(sel.work, u, c)  # 0 unless it reads the unit inside a concatenation
        W, fit_err = refit(st, fit_keep, ridge=cfg.ridge)
        chosen, kind = W, "least-squares"
        held_err = None
        if st.held is not None:
            held_err = held_error(st.held, fit_keep, W)
            W0 = regression_weights(mod, fit_keep, off)  # the consumer's weights, sliced
            held0 = held_error(st.held, fit_keep, W0)
            if held0 < held_err:
                chosen, kind, held_err = W0, "original", held0
                fit_err = subset_error(st, fit_keep, W0)
        kinds.add(kind)
        _install(mod, chosen, len(keep), off, columns)
        unknowns = len(keep) * st.group
        if st.rows < MIN_ROWS_PER_UNKNOWN * unknowns:
            report.warnings.append(
                f"{c}: {st.rows / unknowns:.2f} rows per unknown ({st.rows} rows, {unknowns} unknowns): the re-fit "
                "is under-determined; more calibration images (data.calib_images) would make it reliable"
            )
        err = held_err if held_err is not None else fit_err
        report.consumer_errors[c] = float(err)
        fit_num += fit_err * st.yy
        fit_den += st.yy
        if st.held is not None:
            held_num += err * st.held.yy
            held_den += st.held.yy
    report.fit_error = float(fit_num / (fit_den or 1.0))
    report.rel_error = float(held_num / held_den) if held_den else report.fit_error
    report.refit = (
        "least-squares" if kinds == {"least-squares"} else ("original" if kinds == {"original"} else "mixed")
    )


def _refit_squeeze(sel: _Selection, name: str, st: Stats, keep: list[int], intercept: bool) -> None:
    """Re-fit an SE squeeze conv on the kept channels (plus its bias, when it has one) so it
    reproduces the original squeeze output; kept only where it beats slicing on held-out rows."""
    mod = sel.wmods[name]
    C = st.channels - (1 if intercept else 0)
    cols = keep + ([C] if intercept else [])
    W, _ = refit(st, cols, ridge=sel.cfg.ridge)
    if st.held is not None:
        w0 = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).T  # already sliced: (k, O)
        W0 = torch.cat([w0, w0.new_zeros(1, w0.shape[1])]) if intercept else w0
        if held_error(st.held, cols, W0) < held_error(st.held, cols, W):
            return
    with torch.no_grad():
        if intercept:
            mod.bias.add_(W[-1].to(mod.bias.dtype))
            W = W[:-1]
        _install(mod, W, len(keep), 0, len(keep))  # (already sliced to the kept channels)


# ---------------------------------------------------------------------------------------
