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


@dataclass
class Segment:
    start: int  # index of the cut node it reads (exclusive)
    end: int    # index of the cut node it returns (inclusive)
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


def unit_span(unit: Unit, node_index: dict[str, int], call_node: dict[str, str]) -> tuple[int, int]:
    inside = unit.producers + unit.gate_producers + unit.members + unit.inner_readers
    start = min(node_index[call_node[m]] for m in inside)
    end = max(node_index[call_node[m]] for m in unit.consumers)
    return start, end


@torch.no_grad()
def run_segment(seg: Segment, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [seg.module(x) for x in batches]


# ---------------------------------------------------------------------------------------
# statistics of a consumer: rows are positions, columns are (channel, kernel offset)


def consumer_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input laid out as regression rows (positions x channels*k*k)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    kh, kw = mod.kernel_size
    if (kh, kw) == (1, 1) and mod.padding in ((0, 0), 0) and mod.dilation == (1, 1):
        sh, sw = mod.stride
        x = x[:, :, ::sh, ::sw]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def target_rows(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The consumer's output without its bias, as regression rows (positions x out)."""
    if mod.bias is not None:
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y - mod.bias.view(shape)
    if y.dim() == 2:
        return y
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def kernel_group(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return 1
    return mod.kernel_size[0] * mod.kernel_size[1]


class StatsAccumulator:
    """Accumulates G = X^T X, B = X^T Y, ||Y||^2 in float64 over batches, sampling rows."""

    def __init__(self, fraction: float, generator: torch.Generator):
        self.fraction, self.gen = fraction, generator
        self.G: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None
        self.yy = 0.0
        self.rows = 0

    def add(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        if self.fraction < 1.0:
            n = X.shape[0]
            keep = torch.rand(n, generator=self.gen) < self.fraction
            X, Y = X[keep], Y[keep]
        X, Y = X.float(), Y.float()
        G, B = X.T @ X, X.T @ Y
        if self.G is None:
            self.G, self.B = G.double(), B.double()
        else:
            self.G += G.double()
            self.B += B.double()
        self.yy += float(Y.double().pow(2).sum())
        self.rows += X.shape[0]

    def result(self, group: int) -> Stats:
        assert self.G is not None, "no calibration data reached this consumer"
        return Stats(self.G, self.B, self.yy, group, self.rows)


def row_fraction(mod: nn.Module, x_shape: torch.Size, images: int, max_rows: int) -> float:
    """Fraction of positions to keep so that at most ``max_rows`` rows are used."""
    if isinstance(mod, nn.Linear):
        return 1.0
    h, w = x_shape[-2:]
    sh, sw = mod.stride
    kh, kw = mod.kernel_size
    ph, pw = mod.padding if isinstance(mod.padding, tuple) else (mod.padding, mod.padding)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    total = images * ho * wo
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
    """Re-estimate BatchNorm running statistics on calibration images (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was_training)


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))
