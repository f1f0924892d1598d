"""A latency model of a network as a function of its unit widths, measured on the target runtime.

Granularity: one entry per *layer shape* (HALP's lookup table, Shen et al. NeurIPS 2022). Every
convolution or linear layer whose input or output channels belong to a unit is timed in
isolation on the chosen backend (exported through gslim's ONNX path for the ONNX backends,
timed with the profiler's warm-up and interleaved rounds, median of the samples) at a grid of
widths of the unit(s) it depends on: a 1-D grid when one width sets its shape (MobileNet's
expand/depthwise/project convs, ResNet basic blocks) and a coarse 2-D grid when its input and
output both vary (a ResNet-50 bottleneck's middle conv). A layer on a concatenation reads
several units: its input axis is their total width (DenseNet, GoogLeNet). Between grid points
the time is interpolated linearly.

The whole network is predicted *anchored* at its measured latency:

    predict(widths) = measured(full) + in_network(sum over layers [t_layer(widths) - t_layer(full)])

so what a table cannot see in isolation (fusion, the layers no unit touches, call overhead)
cancels out, and only the layers that change are estimated. Two measured corrections: the
runtime's channel block (:func:`staircase_alignment`: a width between two multiples of it costs
the upper one, so the knapsack buys the upper one), and the in-network per isolated saving, which
depends on how deep and where the cut is, fitted on probe models
(:mod:`gslim.compress.latency_stages`). Why layers and not whole blocks or models: a layer key
(shape, stride, groups, batch) recurs across blocks and models, so a table fills once per machine
and is then shared; blocks would need one trace per architecture, and timing whole models per
width is slower than the noise it must resolve.

The table (:mod:`gslim.compress.latency_table`) is cached on disk, keyed by device, backend,
runtime version, precision, batch and threads (the file) and by layer shape (the entries), as
JSON a person can read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from gslim.compress import latency_stages, latency_table
from gslim.compress.budget import round_width, unit_round_to
from gslim.compress.latency_table import ONNX_BACKENDS, LatencySettings, LatencyTable, LayerShape
from gslim.compress.units import Unit, UnitGraph, layer_roles, shaped

# ----------------------------------------------------------------------------- the model's layers


@dataclass
class _Layer:
    """A layer whose shape depends on unit widths: its input width is the sum of the units it
    reads (several on a concatenation, plus the channels no unit owns), its output width its
    output unit's. Those are its *axes*: one 1-D curve or one 2-D surface is timed over them."""

    name: str
    shape: LayerShape  # at full widths
    in_units: tuple[str, ...]
    out_unit: Optional[str]
    depthwise: bool
    in_full: tuple[int, ...] = ()  # the full widths of ``in_units``

    def axes(self) -> list[str]:
        """'in' and/or 'out': the widths its shape depends on (one for a carried depthwise)."""
        out = ["in"] if self.in_units else []
        if self.out_unit is not None and (self.out_unit,) != self.in_units:
            out.append("out")
        return out

    def value(self, axis: str, widths: dict[str, int]) -> int:
        """The layer's input (``axis`` 'in') or output width for these unit widths."""
        s = self.shape
        if axis == "out":
            return widths.get(self.out_unit, s.cout) if self.out_unit else s.cout
        return s.cin + sum(widths.get(u, f) - f for u, f in zip(self.in_units, self.in_full))

    def computed(self, axis: str, widths: dict[str, int], align: int) -> int:
        """:meth:`value` as the runtime computes it: up to the next multiple of its channel block."""
        return aligned(self.value(axis, widths), self.shape.cout if axis == "out" else self.shape.cin, align)

    def grid(self, axis: str, grids: dict[str, list[int]]) -> list[int]:
        """The widths of ``axis`` to time: the unit's grid, or for a sum of units evenly spaced
        totals from all of them at their smallest to all at full."""
        if axis == "out":
            return grids[self.out_unit]
        if len(self.in_units) == 1:
            return [self.shape.cin - self.in_full[0] + w for w in grids[self.in_units[0]]]
        lo = self.shape.cin - sum(f - grids[u][0] for u, f in zip(self.in_units, self.in_full))
        points = max(len(grids[u]) for u in self.in_units)
        hi = self.shape.cin
        return sorted({int(round(lo + (hi - lo) * i / max(1, points - 1))) for i in range(points)})

    def axis_grids(self, grids: dict[str, list[int]]) -> list[list[int]]:
        """The timed widths of each of its axes (coarser where two vary: a 2-D surface)."""
        axes = self.axes()
        return [self.grid(a, grids) if len(axes) == 1 else coarse_grid(self.grid(a, grids)) for a in axes]

    def at(self, widths: dict[str, int]) -> LayerShape:
        return self.shape_at(self.value("in", widths), self.value("out", widths))

    def shape_at(self, cin: int, cout: int) -> LayerShape:
        s = self.shape
        groups = s.groups
        if self.depthwise:  # carrying a unit (in == out): the group width stays, whole groups go
            cout, groups = cin, cin // (s.cin // s.groups)
        return LayerShape(s.op, cin, cout, groups, s.kernel, s.stride, s.padding, s.dilation, s.hw, s.bias)

    def at_axes(self, values: dict[str, int]) -> LayerShape:
        return self.shape_at(values.get("in", self.shape.cin), values.get("out", self.shape.cout))


def model_layers(graph: UnitGraph, units: list[Unit], input_size: int) -> list[_Layer]:
    """Every conv/linear layer that reads, writes or carries a unit's channels, with its shape."""
    reads, writes, carries = layer_roles(units)
    full = {u.name: u.width for u in units}
    gm = shaped(graph, input_size)
    mods = dict(gm.named_modules())
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in (reads.keys() | writes.keys() | carries.keys()):
            continue
        mod, name = mods[node.target], node.target
        src = node.args[0].meta.get("tensor_meta") if node.args and hasattr(node.args[0], "meta") else None
        in_shape = tuple(src.shape) if src is not None else ()
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                continue  # timed like a zero-padded conv would mislead; such convs keep their cost fixed
            shape = LayerShape(
                "conv",
                mod.in_channels,
                mod.out_channels,
                mod.groups,
                tuple(mod.kernel_size),
                tuple(mod.stride),
                tuple(mod.padding),
                tuple(mod.dilation),
                (int(in_shape[2]), int(in_shape[3])),
                mod.bias is not None,
            )
            depthwise = name in carries
            ins = tuple(carries[name] if depthwise else reads.get(name, ()))
            out = carries[name][0] if depthwise else writes.get(name)
            layers.append(_Layer(name, shape, ins, out, depthwise, tuple(full[u] for u in ins)))
        elif isinstance(mod, nn.Linear):
            # on a channels-last map (N, H, W, C) the Linear runs at every position
            hw = (int(in_shape[1]), int(in_shape[2])) if len(in_shape) == 4 else (1, 1)
            shape = LayerShape("linear", mod.in_features, mod.out_features, hw=hw, bias=mod.bias is not None)
            ins = tuple(reads.get(name, ()))
            layers.append(_Layer(name, shape, ins, writes.get(name), False, tuple(full[u] for u in ins)))
    return layers


def width_grid(full: int, points: int, round_to: int, min_width: int) -> list[int]:
    """``points`` widths from the smallest allowed to ``full``, on multiples of ``round_to``."""
    lo = round_width(1, full, round_to, min_width)
    if full <= lo or points <= 1:
        return sorted({lo, full})
    raw = [lo + (full - lo) * i / (points - 1) for i in range(points)]
    return sorted({round_width(int(round(r)), full, round_to, min_width) for r in raw} | {lo, full})


def alignment_probe(step: int) -> list[LayerShape]:
    """The layers that find the runtime's channel alignment: a 1x1 conv whose output width
    steps by ``step`` from 4 to 16 steps (at 28x28, large enough that work, not the call, is
    timed, and small enough to time in milliseconds)."""
    return [LayerShape("conv", 64, w, hw=(28, 28)) for w in range(4 * step, 16 * step + 1, step)]


def staircase_alignment(widths: list[int], ms: list[float], step: int) -> int:
    """The widest alignment ``step * 2**j`` at which the measured time is flat inside each step.

    Runtimes compute channels in blocks (ONNX Runtime CPU's NCHWc layout is 16 channels wide on
    AVX-512, 8 on AVX2; tensor cores want multiples of 8 in FP16): a width between two multiples
    of the block costs what the next multiple costs (measured, ORT CPU, 1x1 conv 32->w at 28x28:
    24 channels 0.0216 ms, 32 channels 0.0217; 40 channels 0.0263, 48 0.0268). Alignment A is
    accepted when the rises between widths inside one step of A add up to at most a fifth of the
    whole rise over the probe; when the probe shows no rise (a launch-bound layer) it says nothing
    and ``step`` is returned.
    """
    total = ms[-1] - ms[0]
    if total <= 0.1 * ms[0]:
        return step
    best, align = step, 2 * step
    while align <= (widths[-1] - widths[0]) // 2:
        inside = sum(ms[i + 1] - ms[i] for i in range(len(widths) - 1) if widths[i] % align != 0)
        if inside > 0.2 * total:
            break
        best, align = align, 2 * align
    return best


def aligned(v: int, full: int, align: int) -> int:
    """The width the runtime computes for ``v`` channels: the next multiple of ``align``, at most
    the layer's full width."""
    return min(-(-v // align) * align, full) if align > 1 else v


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); linear extrapolation outside."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0


# ----------------------------------------------------------------------------- the model


class LatencyModel:
    """Predicted milliseconds of the network for any unit widths (see the module docstring)."""

    def __init__(
        self,
        layers: list[_Layer],
        full: dict[str, int],
        grids: dict[str, list[int]],
        table: LatencyTable,
        full_ms: float,
        alpha: float = 1.0,
        align: int = 1,
    ):
        self.layers, self.full, self.grids, self.table, self.full_ms = layers, full, grids, table, full_ms
        self.align = align  # the runtime's channel block: a width costs what its next multiple costs
        # in-network per isolated ms (see latency_stages): pooled (and before calibration, the
        # only one), the depth map through the uniform probes, and one ratio per stage
        self.alpha = alpha
        self.savings: list[tuple[float, float]] = []
        self.probes: list[dict[str, Any]] = []
        # each layer's measured curve (1-D) or surface (2-D), looked up once
        self._curves = []
        for ly in layers:
            axes, xs = ly.axes(), ly.axis_grids(grids)
            if len(axes) == 1:
                ys = [table.lookup(ly.at_axes({axes[0]: x})) for x in xs[0]]
            else:
                ys = [[table.lookup(ly.at_axes({"in": va, "out": vb})) for vb in xs[1]] for va in xs[0]]
            self._curves.append((axes, tuple(xs), ys))
        self._full_layer_ms = [self._layer_ms(i, full) for i in range(len(layers))]
        self._of_unit: dict[str, list[int]] = {}
        for i, ly in enumerate(layers):
            for u in {*ly.in_units, *([ly.out_unit] if ly.out_unit else [])}:
                self._of_unit.setdefault(u, []).append(i)
        # the resolution stage of each layer and each stage's in-network per isolated ms
        self.stage_of = latency_stages.layer_stages(layers, self._full_layer_ms) if layers else []
        self.stages = max(self.stage_of, default=-1) + 1
        self.alphas = [alpha] * self.stages

    @classmethod
    def build(
        cls,
        model: nn.Module,
        graph: UnitGraph,
        units: list[Unit],
        input_size: int,
        settings: LatencySettings,
        table: LatencyTable,
        *,
        round_to: int = 8,
        min_width: int = 8,
        full_ms: Optional[float] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "LatencyModel":
        """Measure what the table lacks for this model (and the full model's latency) and build."""
        layers = model_layers(graph, units, input_size)
        full = {u.name: u.width for u in units}
        # below 8 the probe steps by 4 (steps of 1 or 2 over 4..16 channels could not show a block
        # of 16); what it cannot resolve is no block at all
        step = round_to if round_to >= 8 else 4
        probe = alignment_probe(step)
        table.measure(probe, settings)
        align = staircase_alignment([s.cout for s in probe], [table.lookup(s) for s in probe], step)
        align = align if align > step else max(round_to, 1)
        # the grid on the staircase's tops: what lies between two of them costs the upper one
        grids = {
            u.name: width_grid(u.width, settings.grid, unit_round_to(max(round_to, align), u.atom), min_width)
            for u in units
        }
        table.measure(list(_grid_shapes(layers, grids)), settings, progress)
        if full_ms is None:
            full_ms = latency_table.measure_model(model, input_size, settings, table)
        return cls(layers, full, grids, table, full_ms, align=align)

    def _layer_ms(self, i: int, widths: dict[str, int]) -> float:
        names, axes, ys = self._curves[i]
        ly = self.layers[i]
        if len(names) == 1:
            return _interp(axes[0], ys, ly.computed(names[0], widths, self.align))
        xb = ly.computed("out", widths, self.align)
        return _interp(
            axes[0], [_interp(axes[1], row, xb) for row in ys], ly.computed("in", widths, self.align)
        )

    def delta(self, widths: dict[str, int]) -> float:
        """Isolated-layer milliseconds these widths save (negative) against the full model."""
        return sum(self._changes(widths))

    def stage_deltas(self, widths: dict[str, int]) -> list[float]:
        """:meth:`delta` per resolution stage."""
        out = [0.0] * self.stages
        for s, c in zip(self.stage_of, self._changes(widths)):
            out[s] += c
        return out

    def _changes(self, widths: dict[str, int]) -> list[float]:
        """Each layer's isolated change against the full model, computed once per prediction."""
        return [self._layer_ms(i, widths) - t for i, t in enumerate(self._full_layer_ms)]

    def _by_depth(self, isolated: float) -> float:
        """The in-network change by the depth map through the uniform probes (before
        calibration, the pooled ratio)."""
        if not self.savings or isolated >= 0:
            return self.alpha * isolated
        xs, ys = zip(*([(0.0, 0.0)] + self.savings))
        return -_interp(list(xs), list(ys), -isolated)

    def _combine(self, isolated: float, staged: float) -> float:
        """The prediction from the total isolated change and the stage-scaled one: the mean of
        the depth map's and the stage model's (see latency_stages)."""
        return self.full_ms + 0.5 * (self._by_depth(isolated) + staged)

    def parts(self, widths: dict[str, int]) -> tuple[float, float]:
        """The two calibrations' predictions of these widths, (depth map, stage model), whose
        mean is :meth:`predict` (for benchmarks/latency_calibration.py)."""
        ch = self._changes(widths)
        return self.full_ms + self._by_depth(sum(ch)), self.full_ms + self._staged(ch)

    def predict(self, widths: dict[str, int]) -> float:
        """Milliseconds of the model with these unit widths (others at full width)."""
        ch = self._changes(widths)
        return self._combine(sum(ch), self._staged(ch))

    def _staged(self, changes: list[float]) -> float:
        """The stage model's in-network change: each layer's change times its stage's ratio."""
        return sum(self.alphas[s] * c for s, c in zip(self.stage_of, changes))

    def predict_moves(self, widths: dict[str, int], unit: str, ks: list[int]) -> list[float]:
        """:meth:`predict` with ``unit`` at each width of ``ks``: only the unit's layers re-priced."""
        mine = self._of_unit.get(unit, [])
        ch = self._changes(widths)
        others = set(range(len(self.layers))) - set(mine)
        iso = sum(ch[i] for i in others)
        staged = sum(self.alphas[self.stage_of[i]] * ch[i] for i in others)
        out = []
        for k in ks:
            w = {**widths, unit: k}
            mine_ch = [self._layer_ms(i, w) - self._full_layer_ms[i] for i in mine]
            mine_staged = sum(self.alphas[self.stage_of[i]] * c for i, c in zip(mine, mine_ch))
            out.append(self._combine(iso + sum(mine_ch), staged + mine_staged))
        return out

    def calibrate(
        self,
        model: nn.Module,
        units: list[Unit],
        input_size: int,
        settings: LatencySettings,
        round_to: int,
        min_width: int,
        fractions: tuple[float, ...] = (0.75, 0.5, 0.25),
    ) -> None:
        """Map the isolated-layer savings to what the runtime saves in the whole network (by the
        depth of the cut and per resolution stage), from probe models timed with the full model
        (:func:`gslim.compress.latency_stages.calibrate`); ``full_ms`` becomes that session's
        full model. Cached in the table under the model's key."""
        latency_stages.calibrate(self, model, units, input_size, settings, round_to, min_width, fractions)

    def describe(self) -> dict[str, Any]:
        return {
            "granularity": "layer shape (1-D grid per layer width, 2-D where its input and output both vary)",
            "table": str(self.table.path),
            "context": self.table.context,
            "layers": len(self.layers),
            "entries": len(self.table.entries),
            "measured_now": self.table.measured_now,
            "full_ms": self.full_ms,
            "alpha": self.alpha,
            "stages": self.stages,
            "alphas": self.alphas,
            "savings": self.savings,
            "align": self.align,
            "probes": self.probes,
        }


def coarse_grid(g: list[int]) -> list[int]:
    """At most four of a grid's widths (both ends kept), for layers that two units shape."""
    return g if len(g) <= 4 else sorted({g[0], g[len(g) // 3], g[2 * len(g) // 3], g[-1]})


def _grid_shapes(layers: list[_Layer], grids: dict[str, list[int]]):
    for ly in layers:
        for values in itertools.product(*ly.axis_grids(grids)):
            yield ly.at_axes(dict(zip(ly.axes(), values)))


@dataclass
class LatencyRequest:
    """What :func:`gslim.compress.select.compress_model` needs for a latency budget: where to
    measure, the table, and the budget (``kind`` 'ms' or 'fraction' of the full model). The
    latency model is built (and calibrated) on first use and reused by later rounds of the closed
    loop, which moves the planning target by ``scale``."""

    settings: LatencySettings
    table: LatencyTable
    kind: str
    value: float
    progress: Optional[Callable[[int, int], None]] = None
    scale: float = 1.0
    built: Optional[LatencyModel] = None

    @property
    def target_ms(self) -> float:
        """The planning target in predicted milliseconds."""
        assert self.built is not None, "model_for first"
        return (self.value if self.kind == "ms" else self.value * self.built.full_ms) * self.scale

    def model_for(
        self,
        work: nn.Module,
        graph: UnitGraph,
        units: list[Unit],
        input_size: int,
        round_to: int,
        min_width: int,
    ) -> LatencyModel:
        if self.built is None:
            self.built = LatencyModel.build(
                work,
                graph,
                units,
                input_size,
                self.settings,
                self.table,
                round_to=round_to,
                min_width=min_width,
                progress=self.progress,
            )
            self.built.calibrate(work, units, input_size, self.settings, round_to, min_width)
        return self.built


def settings_from_recipe(recipe: Any) -> LatencySettings:
    """compress.latency, with unset values from the profile section."""
    from gslim.runtime import get_backend

    lat, prof = recipe.compress.latency, recipe.profile
    backend = lat.backend
    if backend is None:  # the first ONNX runtime the recipe profiles on: what gets deployed
        backend = next((b for b in prof.backends if b in ONNX_BACKENDS), "ort-cpu")
    get_backend(backend)
    precision = lat.precision or ("fp16" if prof.fp16 else "fp32")
    return LatencySettings(
        backend=backend,
        batch=lat.batch or prof.batch_sizes[0],
        threads=lat.threads or prof.threads,
        precision=precision,
        grid=lat.grid,
    )
