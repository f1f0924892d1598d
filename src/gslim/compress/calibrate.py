"""Calibration passes: walk the network segment by segment on cached activations.

The traced graph is cut at points where exactly one tensor is alive (block boundaries)
and never inside a unit (between its first producer and its last consumer). Each
segment becomes a small GraphModule sharing the model's submodules, so the greedy pass
can run "segment s of the original network on the original activations" and "segment s
of the network pruned so far on the pruned activations" side by side, batch by batch,
and only ever pay for one pass of each network over the calibration set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gslim.compress.bn_recalib import recalibrate_bn  # noqa: F401 - its long-standing import path
from gslim.compress.dense_stats import explicit_padding, prefer_dense
from gslim.compress.fast_passes import reuse_add_operands, reuses_add_operands
from gslim.compress.slim import column_offset

# the sums live in their own module; their long-standing import path is this one
from gslim.compress.sums import HOLDOUT_FRACTION, Sample, StatsAccumulator  # noqa: F401
from gslim.compress.units import Unit


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
        # (placeholders keep their node's name, as split_segment's do: which unit's channels a
        # value carries is known by name, Unit.values)
        env: dict[fx.Node, fx.Node] = {nodes[a]: g.placeholder(nodes[a].name)}
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
    live: list[str]  # names of the head's nodes that the tail reads: its placeholders, in order


def split_segment(seg: fx.GraphModule, at: str) -> Optional[SegmentTail]:
    """Split ``seg`` before its ``call_module`` node of module ``at`` (None: no such node)."""
    nodes = list(seg.graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == at), None)
    return None if cut is None else _split(seg, nodes, cut)


def split_before_node(seg: fx.GraphModule, name: str) -> Optional[SegmentTail]:
    """Split ``seg`` before its node named ``name`` (None: no such node)."""
    nodes = list(seg.graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if n.name == name and n.op != "placeholder"), None)
    return None if cut is None else _split(seg, nodes, cut)


def _split(seg: fx.GraphModule, nodes: list[fx.Node], cut: int) -> SegmentTail:
    later = set(nodes[cut:])
    # get_attr values are recreated in the tail (after surgery they must be the new tensors)
    live = [n for n in nodes[:cut] if n.op != "get_attr" and any(u in later for u in n.users)]
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:cut]:
        env[n] = head.node_copy(n, lambda m: env[m])
    head.output(tuple(env[n] for n in live))
    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {n: tail.placeholder(n.name) for n in live}
    for n in nodes[:cut]:
        if n.op == "get_attr" and any(u in later for u in n.users):
            tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    for n in nodes[cut:]:
        tenv[n] = tail.node_copy(n, lambda m: tenv[m])
    root = seg
    parts = fx.GraphModule(root, head), fx.GraphModule(root, tail)
    if reuses_add_operands(seg):  # (re-decided per part: a value the cut keeps is not reused)
        parts = tuple(reuse_add_operands(p) for p in parts)
    return SegmentTail(*parts, [n.name for n in live])


def unit_span(unit: Unit, node_index: dict[str, int], call_node: dict[str, str]) -> tuple[int, int]:
    inside = unit.producers + unit.gate_producers + unit.members + unit.inner_readers
    start = min(node_index[call_node[m]] for m in inside)
    end = max(node_index[call_node[m]] for m in unit.consumers)
    return start, end


# ---------------------------------------------------------------------------------------
# statistics of a consumer: rows are positions, columns are (channel, kernel offset)


def _padded(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded the way the conv pads it (zeros, reflect, replicate or circular)."""
    pad = explicit_padding(mod)
    if not any(pad):
        return x
    if mod.padding_mode == "zeros":
        return F.pad(x, pad)
    return F.pad(x, pad, mode=mod.padding_mode)


def consumer_rows(mod: nn.Module, x: torch.Tensor, pick: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The consumer's input laid out as regression rows (positions x channels*k*k), or only the
    rows ``pick`` (indices into that layout) when given.

    Sampled rows are gathered straight from the padded input: unfolding the whole batch to keep
    ~1% of it was the largest cost of selection on k x k consumers (measured, 1 thread, 32
    images: 370 ms to unfold 64 channels at 56 x 56 against 12 ms to gather its 1,140 sampled
    rows). Always a new tensor: a later in-place op on ``x`` cannot change the rows.
    """
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return _own(rows, x) if pick is None else rows[pick.to(x.device)]
    kh, kw = mod.kernel_size
    src, x = x, _padded(mod, x)
    sh, sw = mod.stride
    dh, dw = mod.dilation
    ho, wo = conv_output_shape(mod, src.shape)[2:]
    if pick is not None and pick.shape[0] < x.shape[0] * ho * wo:  # (indices are distinct: all rows else)
        pick = pick.to(x.device)
        n, pos = pick // (ho * wo), pick % (ho * wo)
        h = (pos // wo)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # (rows, kh)
        w = (pos % wo)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # (rows, kw)
        patches = x[n[:, None, None], :, h[:, :, None], w[:, None, :]]  # (rows, kh, kw, C)
        return patches.permute(0, 3, 1, 2).reshape(pick.shape[0], -1)  # unfold's (C, kh, kw) order
    if (kh, kw) == (1, 1) and mod.dilation == (1, 1):
        x = x[:, :, ::sh, ::sw]
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    else:
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=0, stride=mod.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return _own(rows if pick is None else rows[pick.to(rows.device)], src)


def conv_output_shape(m: nn.Conv2d, x_shape: torch.Size) -> torch.Size:
    """The shape of ``m``'s output on an input of ``x_shape`` (any padding mode or spec)."""
    left, right, top, bottom = explicit_padding(m)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ho = (x_shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (x_shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return torch.Size((x_shape[0], m.out_channels, ho, wo))


def unit_columns(
    mod: nn.Module, unit: Unit, layer: str, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression of ``unit``'s own columns when ``layer`` reads it inside a concatenation:
    its columns of ``X``, and the target ``Y`` less what the other inputs of the concatenation
    contribute through the layer's current weights (those columns are not this unit's to fit).
    ``X`` and ``Y`` unchanged when the layer reads the unit alone."""
    if layer not in unit.concat_before:
        return X, Y
    kk = kernel_group(mod)
    off = column_offset(model, unit, layer)
    mine = torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
    mine[off * kk : (off + width) * kk] = True
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1)[:, ~mine.to(mod.weight.device)]
    return X[:, mine], Y - X[:, ~mine] @ w.T.to(X.device, X.dtype)


def row_count(mod: nn.Module, y: torch.Tensor) -> int:
    """Regression rows in a consumer's output (positions of all images): a Linear's output
    has its channels last (one row per image, or per position of a channels-last map)."""
    return y.numel() // y.shape[-1 if isinstance(mod, nn.Linear) else 1]


def target_rows(mod: nn.Module, y: torch.Tensor, pick: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The consumer's output without its bias, as regression rows (positions x out), or only
    the rows ``pick``.

    Always a new tensor, so it can be taken inside a hook and kept: an in-place activation
    after the consumer (``ReLU(inplace=True)``) would otherwise overwrite the target.
    """
    src = y
    if isinstance(mod, nn.Linear):  # channels last: (N, O) or a channels-last map (N, H, W, O)
        y = y.reshape(-1, y.shape[-1])
    elif y.dim() != 2 and pick is not None:
        # row p is position (image p // HW, pixel p % HW): gather the picked rows from the map
        # instead of laying the whole map out channels-last first (MobileNetV2 at 224 px, 256
        # images: 0.59 s of copies, most of them for rows the sample drops)
        pick = pick.to(y.device)
        hw = y.shape[2] * y.shape[3]
        y, pick = y.flatten(2)[pick // hw, :, pick % hw], None  # (rows, O): advanced indices first
    elif y.dim() != 2:
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    if pick is not None:
        y = y[pick.to(y.device)]
    if mod.bias is not None:
        y = y - mod.bias
    return _own(y, src)


def target_map(mod: nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
    """The conv's whole output map without its bias (N, O, Ho, Wo), for dense statistics; a new
    tensor, like :func:`target_rows`."""
    return y - mod.bias.view(1, -1, 1, 1) if mod.bias is not None else y.clone()


def batch_targets(mod: nn.Module, y: torch.Tensor, sample: "Sample") -> torch.Tensor:
    """What a batch's sample keeps of the consumer's output: the sampled rows, or the whole map
    where the statistics are dense."""
    return target_map(mod, y) if sample.pick is None else target_rows(mod, y, sample.pick)


def _own(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it has its own memory, else a copy (a view of ``src`` could be
    overwritten by an in-place op on ``src``)."""
    if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return t.clone()
    return t


def regression_weights(mod: nn.Module, cols: Sequence[int], off: int = 0) -> torch.Tensor:
    """The layer's current weights for input channels ``cols`` (after ``off`` others) in the
    regression layout (channels*k*k x out, float64), as :func:`consumer_rows` lays out the features."""
    w = mod.weight.detach().double()
    w = w[:, off + torch.as_tensor(cols, dtype=torch.long)]
    return w.reshape(w.shape[0], -1).T


def kernel_group(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return 1
    return mod.kernel_size[0] * mod.kernel_size[1]


def rows_per_image(mod: nn.Module, y_shape: torch.Size) -> int:
    """Regression rows one image contributes: the consumer's output positions."""
    if isinstance(mod, nn.Linear):  # one row per image, or per position of a channels-last map
        return math.prod(int(d) for d in y_shape[1:-1])
    if len(y_shape) == 2:
        return 1
    return int(y_shape[-1] * y_shape[-2])


def sampling(
    mod: nn.Module,
    x_shape: torch.Size,
    y_shape: torch.Size,
    images: int,
    max_rows: int,
    dense_ok: bool = True,
) -> tuple[float, bool]:
    """(fraction of rows to sample, whether to take every row through dense statistics instead):
    dense where it costs less than the sample (``dense_ok``: the caller can use a whole Gram)."""
    fraction = row_fraction(mod, y_shape, images, max_rows)
    return fraction, dense_ok and prefer_dense(mod, tuple(x_shape), fraction, rows_per_image(mod, y_shape))


def row_fraction(mod: nn.Module, y_shape: torch.Size, images: int, max_rows: int) -> float:
    """Fraction of positions to keep so that at most ``max_rows`` rows are used (from the
    consumer's *output* shape, which already accounts for stride, dilation and padding)."""
    if isinstance(mod, nn.Linear) and len(y_shape) == 2:
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


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))
