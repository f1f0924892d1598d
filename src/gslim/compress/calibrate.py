"""Calibration passes: walk the network segment by segment on cached activations.

The traced graph is cut at points where exactly one tensor is alive (block boundaries)
and never inside a unit (between its first producer and its last consumer). Each
segment becomes a small GraphModule sharing the model's submodules, so the greedy pass
can run "segment s of the original network on the original activations" and "segment s
of the network pruned so far on the pruned activations" side by side, batch by batch,
and only ever pay for one pass of each network over the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gslim.compress.omp import Stats
from gslim.compress.units import Unit
from gslim.errors import GslimError


@dataclass
class Segment:
    start: int  # index of the cut node it reads (exclusive)
    end: int  # index of the cut node it returns (inclusive)
    module: fx.GraphModule


def cut_points(gm: fx.GraphModule, spans: Iterable[tuple[int, int]]) -> list[int]:
    """Indices of nodes whose output is the only live value, outside every (start, end) span."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    blocked = [False] * len(nodes)
    for a, b in spans:
        for i in range(a, b):
            blocked[i] = True
    cuts, live_until = [], -1
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if live_until <= i and not blocked[i] and n.op != "get_attr":
            cuts.append(i)
        live_until = max(live_until, last_use[i])
    return cuts


def build_segments(gm: fx.GraphModule, cuts: list[int], root: Optional[nn.Module] = None) -> list[Segment]:
    """One GraphModule per interval between consecutive cuts (and one up to the output).

    The segments call the layers of ``root`` (default: ``gm``), which may be another model
    with the same layer names, e.g. the original network next to its pruned copy.
    """
    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    final = out_node.args[0]
    ends = cuts[1:] + [nodes.index(final)]
    segments = []
    for a, b in zip(cuts, ends):
        if b <= a:
            continue
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {nodes[a]: g.placeholder("x")}
        for n in nodes[a + 1 : b + 1]:
            env[n] = g.node_copy(n, lambda m: env[m])
        g.output(env[nodes[b]])
        segments.append(Segment(a, b, fx.GraphModule(root if root is not None else gm, g)))
    return segments


@dataclass
class SegmentTail:
    """A segment split at a node: ``head(x)`` returns the values alive across the cut, and
    ``tail(*live)`` computes the segment's output from them. Rerunning only the tail after a
    unit's surgery reuses everything before its consumer (kept channels' values do not change)."""

    head: fx.GraphModule
    tail: fx.GraphModule
    live: list[str]  # names of the head's nodes that the tail reads, in its placeholder order


def split_segment(seg: fx.GraphModule, at: str) -> Optional[SegmentTail]:
    """Split ``seg`` before its ``call_module`` node of module ``at`` (None: no such node)."""
    nodes = list(seg.graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == at), None)
    if cut is None:
        return None
    later = set(nodes[cut:])
    # get_attr values are recreated in the tail (after surgery they must be the new tensors)
    live = [n for n in nodes[:cut] if n.op != "get_attr" and any(u in later for u in n.users)]
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:cut]:
        env[n] = head.node_copy(n, lambda m: env[m])
    head.output(tuple(env[n] for n in live))
    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {n: tail.placeholder(f"live_{i}") for i, n in enumerate(live)}
    for n in nodes[:cut]:
        if n.op == "get_attr" and any(u in later for u in n.users):
            tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    for n in nodes[cut:]:
        tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    root = seg
    return SegmentTail(fx.GraphModule(root, head), fx.GraphModule(root, tail), [n.name for n in live])


def unit_span(unit: Unit, node_index: dict[str, int], call_node: dict[str, str]) -> tuple[int, int]:
    inside = unit.producers + unit.gate_producers + unit.members + unit.inner_readers
    start = min(node_index[call_node[m]] for m in inside)
    end = max(node_index[call_node[m]] for m in unit.consumers)
    return start, end


# ---------------------------------------------------------------------------------------
# statistics of a consumer: rows are positions, columns are (channel, kernel offset)


def explicit_padding(mod: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the conv applies, also for ``padding='same'``."""
    # nn.Conv2d keeps this for every padding spec (it is what it hands F.pad for non-zero
    # modes), so 'same' with an even kernel gets its asymmetric split exactly as the conv does
    return tuple(int(p) for p in mod._reversed_padding_repeated_twice)  # type: ignore[return-value]


def _padded(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded the way the conv pads it (zeros, reflect, replicate or circular)."""
    pad = explicit_padding(mod)
    if not any(pad):
        return x
    if mod.padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=mod.padding_mode)


def consumer_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input laid out as regression rows (positions x channels*k*k).

    Always a new tensor: a later in-place op on ``x`` cannot change the rows.
    """
    if isinstance(mod, nn.Linear):
        return _own(x.reshape(-1, x.shape[-1]), x)
    kh, kw = mod.kernel_size
    src, x = x, _padded(mod, x)
    if (kh, kw) == (1, 1) and mod.dilation == (1, 1):
        sh, sw = mod.stride
        x = x[:, :, ::sh, ::sw]
        return _own(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), src)
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=0, stride=mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def target_rows(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The consumer's output without its bias, as regression rows (positions x out).

    Always a new tensor, so it can be taken inside a hook and kept: an in-place activation
    after the consumer (``ReLU(inplace=True)``) would otherwise overwrite the target.
    """
    src = y
    if mod.bias is not None:
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y - mod.bias.view(shape)
    if y.dim() != 2:
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return _own(y, src)


def _own(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it has its own memory, else a copy (a view of ``src`` could be
    overwritten by an in-place op on ``src``)."""
    if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return t.clone()
    return t


def kernel_group(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return 1
    return mod.kernel_size[0] * mod.kernel_size[1]


HOLDOUT_FRACTION = 0.2  # of the sampled rows, kept out of the fit to measure its error honestly


class StatsAccumulator:
    """Accumulates G = X^T X, B = X^T Y, ||Y||^2 in float64 over batches.

    Rows are sampled (``fraction``) and a seeded share of them (``holdout``) goes to a second,
    held-out set of the same sums: the fit uses the first, its error is measured on the second.
    ``draw`` gives the sampling mask of a batch before its rows exist, so features and targets
    taken in different passes (pruned and original network) use the same rows.
    """

    def __init__(self, fraction: float, generator: torch.Generator, holdout: float = HOLDOUT_FRACTION):
        self.fraction, self.gen, self.holdout = fraction, generator, holdout
        self.fit = _Sums()
        self.held = _Sums()

    def draw(self, n: int) -> torch.Tensor:
        """Indices of the rows (out of ``n``) that this batch contributes."""
        if self.fraction >= 1.0:
            return torch.arange(n)
        return torch.nonzero(torch.rand(n, generator=self.gen) < self.fraction).flatten()

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Add a batch's rows (all of them: sample first with ``draw`` or use ``add_all``)."""
        if self.holdout > 0.0:
            held = torch.rand(X.shape[0], generator=self.gen) < self.holdout
            self.fit.add(X[~held], Y[~held])
            self.held.add(X[held], Y[held])
        else:
            self.fit.add(X, Y)

    def add_all(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Sample the rows of a batch, then add them."""
        pick = self.draw(X.shape[0])
        self.add(X[pick], Y[pick])

    def result(self, group: int) -> Stats:
        if self.fit.G is None:
            raise GslimError("no calibration data reached a consumer (is the calibration set empty?)")
        held = None
        if self.held.G is not None and self.held.rows > 0:
            held = Stats(self.held.G, self.held.B, self.held.yy, group, self.held.rows)
        return Stats(self.fit.G, self.fit.B, self.fit.yy, group, self.fit.rows, held=held)


class _Sums:
    def __init__(self) -> None:
        self.G: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None
        self.yy = 0.0
        self.rows = 0

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        X, Y = X.float(), Y.float()
        G, B = X.T @ X, X.T @ Y
        if self.G is None:
            self.G, self.B = G.double(), B.double()
        else:
            self.G += G.double()
            self.B += B.double()
        self.yy += float(Y.double().pow(2).sum())
        self.rows += X.shape[0]


def rows_per_image(mod: nn.Module, y_shape: torch.Size) -> int:
    """Regression rows one image contributes: the consumer's output positions."""
    if isinstance(mod, nn.Linear) or len(y_shape) == 2:
        return 1
    return int(y_shape[-1] * y_shape[-2])


def row_fraction(mod: nn.Module, y_shape: torch.Size, images: int, max_rows: int) -> float:
    """Fraction of positions to keep so that at most ``max_rows`` rows are used (from the
    consumer's *output* shape, which already accounts for stride, dilation and padding)."""
    if isinstance(mod, nn.Linear):
        return 1.0
    total = images * rows_per_image(mod, y_shape)
    return min(1.0, max_rows / max(total, 1))


class Hooks:
    """Context manager that removes its hooks on exit."""

    def __init__(self) -> None:
        self.handles: list = []

    def pre(self, mod: nn.Module, fn: Callable) -> None:
        self.handles.append(mod.register_forward_pre_hook(fn))

    def post(self, mod: nn.Module, fn: Callable) -> None:
        self.handles.append(mod.register_forward_hook(fn))

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics on calibration images, exactly.

    The model runs in eval mode, so Dropout and StochasticDepth stay off and nothing but
    the BatchNorm statistics changes. Each BatchNorm's input is summed (per channel, in
    float64) over every image: the new running mean and variance are the pooled statistics
    of all calibration positions, each batch weighted by its size, and the variance is the
    pooled one (not an average of per-batch variances, which is biased low). While the pass
    runs, each BatchNorm normalises a batch with that batch's own statistics, as training
    mode would, so the layers after it see inputs on the scale the new statistics describe;
    a batch with a single value per channel (BatchNorm1d on one image) uses the running
    statistics instead of failing.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return
    sums: dict[nn.Module, list] = {m: [None, None, 0] for m in bns}

    def hook(m, args, out):
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        acc = sums[m]
        s1, s2 = xd.sum(dims), xd.pow(2).sum(dims)
        acc[0] = s1 if acc[0] is None else acc[0] + s1
        acc[1] = s2 if acc[1] is None else acc[1] + s2
        acc[2] += x.numel() // x.shape[1]
        if x.numel() // x.shape[1] > 1:
            return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
        return out

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, (s1, s2, n) in sums.items():
        if s1 is None or n < 2:
            continue  # never reached (a branch the calibration images do not take)
        mean = s1 / n
        var = (s2 - n * mean.pow(2)).clamp_min(0.0) / (n - 1)  # unbiased, as BatchNorm stores it
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))
