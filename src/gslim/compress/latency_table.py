"""The latency table: measured milliseconds per layer shape (and per whole model) on one
runtime, cached on disk as readable JSON and keyed by device, backend, runtime version,
precision, batch and threads (the file) and by layer shape (the entries). Timing uses the
profiler's method (:func:`gslim.profiling.measure.measure_interleaved`: warm-up, interleaved
rounds, medians) and, for the ONNX backends, gslim's ONNX export path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from gslim.errors import GslimError

TABLE_FORMAT = "gslim-latency-table"
TABLE_VERSION = 1
#: ONNX runtimes (the layer is exported to ONNX); the torch backends time the module itself
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt")


@dataclass(frozen=True)
class LatencySettings:
    """Where and how latency is measured (defaults: the recipe's profile section)."""

    backend: str = "ort-cpu"
    batch: int = 1
    threads: int = 1
    precision: str = "fp32"  # fp32 or fp16 (the backend's half-precision mode)
    grid: int = 8  # widths timed per unit (2-D layers get a coarser grid)
    warmup_s: float = 0.05  # per layer entry
    min_iters: int = 10
    min_seconds: float = 0.03
    rounds: int = 3


@dataclass(frozen=True)
class LayerShape:
    """One convolution or linear layer at given widths: the key of a table entry."""

    op: str  # "conv" or "linear"
    cin: int
    cout: int
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    hw: tuple[int, int] = (1, 1)  # input height, width
    bias: bool = False

    def key(self) -> str:
        d = asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, sort_keys=True)

    def module(self) -> nn.Module:
        if self.op == "linear":
            if self.hw != (1, 1):
                return _ChannelsLastLinear(self.cin, self.cout, self.bias)
            return _FlatLinear(self.cin, self.cout, self.bias)
        return nn.Conv2d(
            self.cin,
            self.cout,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias,
        )


class _FlatLinear(nn.Module):
    """A linear layer fed an (N, C, 1, 1) image tensor, so every runtime gets an NCHW input."""

    def __init__(self, cin: int, cout: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(cin, cout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class _ChannelsLastLinear(nn.Module):
    """A linear layer over every position of a map (ConvNeXt's pointwise layers), fed the same
    NCHW input as the other layers: the reshape reinterprets it as channels-last (a view, no
    copy; the values do not matter to a timing), so what is timed is the MatMul itself."""

    def __init__(self, cin: int, cout: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(cin, cout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.fc(x.reshape(n, h, w, c))


# ----------------------------------------------------------------------------- the table


def cache_dir() -> Path:
    root = os.environ.get("GSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gslim")
    return Path(root) / "latency"


def table_context(settings: LatencySettings) -> dict[str, Any]:
    """What a measured time depends on besides the layer: device, runtime and its version,
    precision, batch, threads. A table is only ever reused under the same context."""
    from gslim.runtime import get_backend

    cls = get_backend(settings.backend)
    try:
        version = __import__(cls.runtime).__version__
    except Exception:  # noqa: BLE001 - the backend's availability check says why it cannot run
        version = None
    if cls.device == "cuda" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        from gslim.environment import cpu_model

        device = cpu_model()
    return {
        "device": device,
        "backend": settings.backend,
        "runtime": cls.runtime,
        "runtime_version": version,
        "precision": settings.precision,
        "batch": settings.batch,
        "threads": settings.threads if cls.device == "cpu" else None,
        **({"cuda_graphs": True} if timing_graphs(settings) else {}),
    }


@dataclass
class LatencyTable:
    """Measured milliseconds per layer shape (and per whole model), under one context."""

    context: dict[str, Any]
    path: Path
    entries: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)  # milliseconds, or calibration points
    measured_now: int = 0  # entries this process measured (0 on a fully cached run)

    @classmethod
    def open(cls, settings: LatencySettings, path: Optional[Path] = None) -> "LatencyTable":
        """The cached table for ``settings`` (``path``: a given file instead of the cache)."""
        ctx = table_context(settings)
        if path is None:
            digest = hashlib.sha1(json.dumps(ctx, sort_keys=True).encode()).hexdigest()[:16]
            path = cache_dir() / f"{settings.backend}-{digest}.json"
        path = Path(path)
        table = cls(ctx, path)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise GslimError(f"cannot read the latency table {path}: {exc}") from exc
            if data.get("format") != TABLE_FORMAT:
                raise GslimError(f"{path} is not a gslim latency table")
            if data.get("context") != ctx:
                diff = [
                    f"{k} {data.get('context', {}).get(k)!r} != {v!r}"
                    for k, v in ctx.items()
                    if data.get("context", {}).get(k) != v
                ]
                raise GslimError(
                    f"the latency table {path} was measured elsewhere ({'; '.join(diff)}); "
                    "its times do not apply here: pass another --latency-table or none"
                )
            table.entries = {k: float(v) for k, v in data.get("entries", {}).items()}
            table.models = {k: _model_value(v) for k, v in data.get("models", {}).items()}
        return table

    def save(self) -> None:
        from gslim.artifacts import save_json

        save_json(
            {
                "format": TABLE_FORMAT,
                "version": TABLE_VERSION,
                "context": self.context,
                "entries": dict(sorted(self.entries.items())),
                "models": self.models,
            },
            self.path,
        )

    def measure(
        self,
        shapes: list[LayerShape],
        settings: LatencySettings,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """Time every shape not in the table yet (interleaved, in groups), then save."""
        todo = list({s.key(): s for s in shapes if s.key() not in self.entries}.values())
        group = 8
        for start in range(0, len(todo), group):
            part = todo[start : start + group]
            self.entries.update(_time_layers(part, settings))
            self.measured_now += len(part)
            if progress is not None:
                progress(min(start + group, len(todo)), len(todo))
            self.save()  # an interrupted build keeps what it measured

    def lookup(self, shape: LayerShape) -> float:
        return self.entries[shape.key()]


def _model_value(v: Any) -> Any:
    """A whole-model entry: milliseconds, a stage calibration (gslim.compress.latency_stages), or
    (tables written before it) a list of (isolated, in-network) saving points."""
    if isinstance(v, dict):
        return v
    if isinstance(v, list):
        return [[float(a) for a in p] for p in v]
    return float(v)


def deployment_matmuls():
    """PyTorch's own TF32 defaults while timing (cuDNN convolutions may use TF32, matmuls may
    not): the selection around a latency budget turns TF32 off for its statistics
    (gslim.compress.select.exact_matmuls), and the timings must not inherit that."""
    from gslim.runtime.cuda import tf32

    return tf32(matmul=False, cudnn=True)


def timing_graphs(settings: LatencySettings) -> Optional[bool]:
    """CUDA graphs on for torch-cuda: one layer launched eagerly times the host's launch cost
    (measured on an H200: MobileNetV2 at batch 1 took 11.2 ms eagerly and 0.71 ms as a graph),
    which says nothing of the GPU's work; other backends keep their default."""
    return True if settings.backend == "torch-cuda" else None


def _time_layers(shapes: list[LayerShape], settings: LatencySettings) -> dict[str, float]:
    """Median milliseconds of each layer on the backend, all timed in one interleaved session."""

    from gslim.profiling.measure import MeasureSettings, measure_interleaved, median
    from gslim.runtime import BackendOptions, get_backend

    cls = get_backend(settings.backend)
    ok, reason = cls.available()
    if not ok:
        raise GslimError(f"latency backend {settings.backend} cannot run here: {reason}")
    ms = MeasureSettings(
        warmup_s=settings.warmup_s,
        min_iters=settings.min_iters,
        min_seconds=settings.min_seconds,
        rounds=settings.rounds,
    )
    with (
        tempfile.TemporaryDirectory(prefix="gslim-latency-") as tmp,
        contextlib.ExitStack() as stack,
        deployment_matmuls(),
    ):
        runners = {}
        for i, s in enumerate(shapes):
            torch.manual_seed(i)
            module = s.module().eval()
            opts = BackendOptions(
                threads=settings.threads,
                fp16=settings.precision == "fp16",
                input_size=s.hw[0],
                seed=i,
                cache_dir=Path(tmp) / "trt_cache",
                input_channels=s.cin,
                cuda_graphs=timing_graphs(settings),
            )
            artifact = _artifact(module, s, settings, Path(tmp) / f"layer{i}")
            backend = cls(artifact, opts)
            stack.enter_context(backend)
            backend.prepare(settings.batch)
            runners[s.key()] = backend
        samples = measure_interleaved(runners, ms)
    return {k: 1e3 * median(v.primary) for k, v in samples.items()}


def _artifact(module: nn.Module, s: LayerShape, settings: LatencySettings, stem: Path):
    """What the backend runs: an ONNX file (ONNX backends, gslim's export path) or the module."""
    if settings.backend in ONNX_BACKENDS:
        from gslim.export.onnx import export_onnx

        path = stem.with_suffix(".onnx")
        export_onnx(
            module,
            s.hw[0],
            path,
            opset=17,
            dynamic_batch=False,
            batch=settings.batch,
            simplify=False,
            channels=s.cin,
            atomic=False,
        )
        return path
    if settings.backend == "trt":
        raise GslimError("the trt latency backend times whole engines only; use ort-trt for the layer table")
    return module


# ----------------------------------------------------------------------------- whole models


def model_key(model: nn.Module, input_size: int) -> str:
    """Identifies a network's structure (every parameter's name and shape) at an input size."""
    h = hashlib.sha1(f"{input_size}".encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return f"model:{type(model).__name__}:{input_size}:{h.hexdigest()[:16]}"


def measure_model(
    model: nn.Module,
    input_size: int,
    settings: LatencySettings,
    table: Optional[LatencyTable] = None,
    *,
    rounds: int = 5,
    min_seconds: float = 1.0,
    others: Optional[dict[str, nn.Module]] = None,
) -> float | dict[str, float]:
    """Median milliseconds of whole models on the backend, interleaved.

    With ``others`` (label -> model), returns {"model": ms, label: ms, ...} measured in one
    session (a slim model against its base: drift cancels); otherwise the model's ms, cached in
    ``table`` under :func:`model_key` when a table is given.
    """
    from gslim.profiling.measure import MeasureSettings, measure_interleaved, median
    from gslim.runtime import BackendOptions, get_backend

    key = model_key(model, input_size)
    if others is None and table is not None and key in table.models:
        return table.models[key]
    cls = get_backend(settings.backend)
    ok, reason = cls.available()
    if not ok:
        raise GslimError(f"latency backend {settings.backend} cannot run here: {reason}")
    models = {"model": model, **(others or {})}
    ms = MeasureSettings(warmup_s=0.5, min_iters=20, min_seconds=min_seconds, rounds=rounds)
    with (
        tempfile.TemporaryDirectory(prefix="gslim-latency-") as tmp,
        contextlib.ExitStack() as stack,
        deployment_matmuls(),
    ):
        runners = {}
        for label, m in models.items():
            opts = BackendOptions(
                threads=settings.threads,
                fp16=settings.precision == "fp16",
                input_size=input_size,
                cache_dir=Path(tmp) / "trt_cache",
                cuda_graphs=timing_graphs(settings),
            )
            s = LayerShape("conv", 3, 3, hw=(input_size, input_size))
            artifact = _artifact(_eval_copy(m), s, settings, Path(tmp) / label)
            backend = cls(artifact, opts)
            stack.enter_context(backend)
            backend.prepare(settings.batch)
            runners[label] = backend
        samples = measure_interleaved(runners, ms)
    out = {k: 1e3 * median(v.primary) for k, v in samples.items()}
    if others is None:
        if table is not None:
            table.models[key] = out["model"]
            table.save()
        return out["model"]
    return out


def _eval_copy(model: nn.Module) -> nn.Module:
    from gslim.export.onnx import export_copy

    return export_copy(model)
