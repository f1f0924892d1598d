"""One small base class, one class per runtime.

Every backend is used as a context manager: ``activate`` loads the artifact (a model, an
ONNX Runtime session, a TensorRT engine) and allocates what it needs, ``infer`` runs a batch
(host in, host logits out: used for accuracy), ``prepare(batch)`` stages a fixed random input
on the device for timing, ``sample(clock)`` runs one timed inference, and ``deactivate``
(always called on exit, also after errors) frees device memory and restores global state
such as PyTorch's thread count.

Runtimes are imported lazily inside the methods, so a missing TensorRT or CUDA costs nothing
until that backend is asked for; ``available()`` says ``(False, reason)`` instead of failing.

Timing, per device:

- CPU backends time the host wall clock around one synchronous inference; there is no
  separate end-to-end figure (there are no transfers).
- GPU backends stage the input in device memory and time *device compute* with CUDA events
  recorded on the backend's own stream around the launch (the primary figure), and, in the
  same iteration, *end-to-end* host wall time including the pinned host→device copy of the
  input and the device→host copy of the logits. ONNX Runtime on CUDA uses IO binding to the
  same device buffers and runs on the same stream, so its transfers are not timed either.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from gslim.errors import GslimError, MissingDependencyError

CPU_BACKENDS = ("torch-cpu", "ort-cpu")
GPU_BACKENDS = ("torch-cuda", "ort-cuda", "ort-trt", "trt")
ARTIFACT_SUFFIX = {"pt": ".pt", "onnx": ".onnx", "engine": ".engine"}


class BackendUnavailable(MissingDependencyError):
    """The runtime, its libraries or the device are missing: the backend is skipped."""


class BatchUnsupported(GslimError):
    """This artifact cannot run this batch size (a fixed-batch ONNX file, an engine's profile)."""


@dataclass
class BackendOptions:
    threads: int = 1  # CPU threads (torch.set_num_threads / ORT intra-op threads)
    fp16: bool = False  # half precision where the backend chooses (torch-cuda, ort-trt)
    channels_last: bool = True  # torch-cuda memory format
    cuda_graphs: Optional[bool] = None  # None: backend default (trt: on where capture works; torch-cuda: off)
    cache_dir: Optional[Path] = None  # ort-trt engine and timing caches
    device_id: int = 0
    input_size: Optional[int] = None  # used when the artifact leaves H/W dynamic
    num_classes: Optional[int] = None
    max_batch: int = 32  # upper end of ort-trt's optimisation profile (dynamic batch)
    opt_batch: int = 1
    seed: int = 0  # seed of the staged random timing input
    precision_hint: Optional[str] = None  # what the engine was built as (trt cannot tell)


# ----------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=1)
def _cpu_info() -> dict[str, Any]:
    from gslim.commands.common import environment_info

    info = environment_info()
    return {"cpu": info["cpu"], "cpu_count": info["cpu_count"]}


def cuda_device_info(device_id: int = 0) -> dict[str, Any]:
    """GPU, driver, CUDA, TensorRT, clocks and power (and a Jetson's power mode): see
    :mod:`gslim.profiling.gpu_context`."""
    from gslim.profiling.gpu_context import gpu_context

    return gpu_context(device_id)


def _as_numpy(batch: Any, dtype: Any = None):
    import numpy as np

    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    arr = np.ascontiguousarray(batch)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def random_input(shape: tuple[int, ...], dtype: Any, seed: int = 0):
    """The fixed timing input: standard normal values (the normalised-image range)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype)


def _torch_cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, "this PyTorch build has no CUDA support (install a CUDA build of torch)"
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, ""


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# ----------------------------------------------------------------------------- base class


class Backend:
    """activate → (infer | prepare → sample…) → deactivate; use ``with Backend(path) as b:``."""

    name: ClassVar[str] = ""
    artifact: ClassVar[str] = "pt"  # which file it runs: 'pt', 'onnx' or 'engine'
    device: ClassVar[str] = "cpu"
    runtime: ClassVar[str] = "torch"  # module whose version is recorded

    def __init__(self, path: str | Path, options: Optional[BackendOptions] = None):
        self.path = Path(path)
        self.options = options or BackendOptions()
        self.notes: list[str] = []
        self.batch: Optional[int] = None
        self.input_hw: Optional[tuple[int, int]] = None
        self.active = False

    # -- availability and life cycle
    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, '')`` when the runtime and device exist; else ``(False, one-line reason)``."""
        return True, ""

    def activate(self) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        """Free everything ``activate`` and ``prepare`` allocated (idempotent)."""

    def __enter__(self) -> "Backend":
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"{self.name}: {reason}")
        if not self.path.is_file():
            raise GslimError(f"{self.name}: artifact not found: {self.path}")
        try:
            self.activate()
        except BaseException:
            self.deactivate()
            raise
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.active = False
        self.deactivate()
        return False

    # -- running
    def infer(self, batch: Any):
        """Logits (numpy float32, batch × classes) for a host batch (numpy or torch)."""
        raise NotImplementedError

    def prepare(self, batch_size: int) -> None:
        """Stage a fixed random input of ``batch_size`` images for :meth:`sample`."""
        raise NotImplementedError

    def run(self) -> None:
        """One synchronous inference on the staged input."""
        raise NotImplementedError

    def sample(self, clock) -> tuple[float, Optional[float]]:
        """One timed inference: ``(primary seconds, end-to-end seconds or None)``."""
        t0 = clock()
        self.run()
        return clock() - t0, None

    # -- description
    @property
    def precision(self) -> str:
        return "fp32"

    def device_info(self) -> dict[str, Any]:
        return {"kind": "cpu", **_cpu_info(), "threads": self.options.threads}

    def runtime_info(self) -> dict[str, Any]:
        try:
            version = __import__(self.runtime).__version__
        except Exception:  # noqa: BLE001
            version = None
        return {"name": self.runtime, "version": version}

    def describe(self) -> dict[str, Any]:
        """Recorded with every result: device, runtime version, precision, options, notes."""
        return {
            "backend": self.name,
            "artifact": str(self.path),
            "device": self.device_info(),
            "runtime": self.runtime_info(),
            "precision": self.precision,
            "timing": "host wall clock" if self.device == "cpu"
            else "device compute (CUDA events); e2e adds host<->device copies",
            "notes": list(self.notes),
        }

    def _stage_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        hw = self.input_hw
        if hw is None:
            if not self.options.input_size:
                raise GslimError(f"{self.name}: {self.path} does not fix its input size; pass the input size")
            hw = (self.options.input_size, self.options.input_size)
        return (batch_size, 3, hw[0], hw[1])


class _CudaTimed:
    """Device-compute timing with CUDA events plus end-to-end timing, on the backend's stream.

    Subclasses set ``_h_in`` (pinned host input), ``_d_in`` (device input), implement
    ``_launch()`` (enqueue the inference on ``self._stream``) and ``_device_out()``, and call
    ``_finish_prepare()`` after staging so the pinned output buffer matches the output.
    """

    _torch: Any
    _stream: Any

    def _init_cuda(self, device_id: int) -> None:
        import torch

        self._torch = torch
        self._dev = torch.device("cuda", device_id)
        torch.cuda.set_device(self._dev)
        self._stream = torch.cuda.Stream(self._dev)
        self._ev0 = torch.cuda.Event(enable_timing=True)
        self._ev1 = torch.cuda.Event(enable_timing=True)
        self._h_in = self._d_in = self._h_out = None

    def _stage_input(self, shape: tuple[int, ...], torch_dtype: Any, channels_last: bool = False) -> None:
        """Pinned host and device input buffers with the same layout (so the copy is one memcpy)."""
        torch = self._torch
        host = torch.from_numpy(random_input(shape, "float32", self.options.seed)).to(torch_dtype)  # type: ignore[attr-defined]
        if channels_last:
            b, c, h, w = shape
            self._h_in = torch.empty((b, h, w, c), dtype=torch_dtype, pin_memory=True).permute(0, 3, 1, 2)
            self._d_in = torch.empty((b, h, w, c), dtype=torch_dtype, device=self._dev).permute(0, 3, 1, 2)
        else:
            self._h_in = torch.empty(shape, dtype=torch_dtype, pin_memory=True)
            self._d_in = torch.empty(shape, dtype=torch_dtype, device=self._dev)
        self._h_in.copy_(host)
        with torch.cuda.stream(self._stream):
            self._d_in.copy_(self._h_in, non_blocking=True)
        self._stream.synchronize()

    def _finish_prepare(self) -> None:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            self._launch()
        self._stream.synchronize()
        out = self._device_out()
        self._h_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)

    def _launch(self) -> None:
        raise NotImplementedError

    def _device_out(self):
        raise NotImplementedError

    def run(self) -> None:
        with self._torch.cuda.stream(self._stream):
            self._launch()
        self._stream.synchronize()

    def sample(self, clock) -> tuple[float, Optional[float]]:
        torch, s = self._torch, self._stream
        t0 = clock()
        with torch.cuda.stream(s):
            self._d_in.copy_(self._h_in, non_blocking=True)
            self._ev0.record(s)
            self._launch()
            self._ev1.record(s)
            self._h_out.copy_(self._device_out(), non_blocking=True)
        s.synchronize()
        t1 = clock()
        return self._ev0.elapsed_time(self._ev1) / 1e3, t1 - t0

    def device_info(self) -> dict[str, Any]:
        return cuda_device_info(self.options.device_id)  # type: ignore[attr-defined]

    def _free_cuda(self) -> None:
        for attr in ("_h_in", "_d_in", "_h_out", "_graph", "_graph_out", "_d_out", "_outs"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        torch = getattr(self, "_torch", None)
        if torch is not None and torch.cuda.is_available():
            if getattr(self, "_stream", None) is not None:
                self._stream.synchronize()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- PyTorch


class TorchCPU(Backend):
    """Eager PyTorch on the CPU with ``torch.set_num_threads(threads)`` (restored afterwards)."""

    name = "torch-cpu"
    artifact = "pt"
    device = "cpu"
    runtime = "torch"

    def activate(self) -> None:
        import torch

        from gslim.models import load_model

        self._torch = torch
        self._prev_threads = torch.get_num_threads()
        torch.set_num_threads(self.options.threads)
        self.model, self.spec = load_model(self.path)
        self.input_hw = (self.spec.input_size, self.spec.input_size)
        if self.options.fp16:
            self.notes.append("fp16 is not used on the CPU; measured in fp32")

    def deactivate(self) -> None:
        self.model = None
        self._x = None
        prev = getattr(self, "_prev_threads", None)
        if prev is not None:
            self._torch.set_num_threads(prev)
            self._prev_threads = None

    def _forward(self, x):
        with self._torch.inference_mode():
            return self.model(x)

    def infer(self, batch: Any):
        x = self._torch.as_tensor(_as_numpy(batch, "float32"))
        return self._forward(x).float().numpy()

    def prepare(self, batch_size: int) -> None:
        self.batch = batch_size
        x = random_input(self._stage_shape(batch_size), "float32", self.options.seed)
        self._x = self._torch.from_numpy(x)

    def run(self) -> None:
        self._forward(self._x)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"torch_threads": self.options.threads}
        return d


class TorchCUDA(_CudaTimed, Backend):
    """Eager PyTorch on CUDA: optional FP16, channels_last and CUDA graphs."""

    name = "torch-cuda"
    artifact = "pt"
    device = "cuda"
    runtime = "torch"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _torch_cuda_available()

    def activate(self) -> None:
        from gslim.models import load_model

        self._init_cuda(self.options.device_id)
        torch = self._torch
        model, self.spec = load_model(self.path)
        self.input_hw = (self.spec.input_size, self.spec.input_size)
        self._dtype = torch.float16 if self.options.fp16 else torch.float32
        model = model.to(self._dev, dtype=self._dtype)
        if self.options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self._graph = self._graph_out = self._d_out = None
        self.use_graphs = bool(self.options.cuda_graphs)  # off unless asked for

    def deactivate(self) -> None:
        self.model = None
        self._free_cuda()

    @property
    def precision(self) -> str:
        return "fp16" if self.options.fp16 else "fp32"

    def infer(self, batch: Any):
        torch = self._torch
        x = torch.as_tensor(_as_numpy(batch, "float32"))
        with torch.cuda.stream(self._stream), torch.inference_mode():
            xd = x.to(self._dev, dtype=self._dtype, non_blocking=False)
            out = self.model(xd).float().cpu()
        self._stream.synchronize()
        return out.numpy()

    def prepare(self, batch_size: int) -> None:
        torch = self._torch
        self.batch = batch_size
        self._graph = self._graph_out = None
        self._stage_input(self._stage_shape(batch_size), self._dtype, self.options.channels_last)
        if self.use_graphs:
            try:
                with torch.inference_mode():
                    with torch.cuda.stream(self._stream):
                        for _ in range(3):  # let cuDNN pick its kernels before capture
                            self.model(self._d_in)
                    self._stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self._stream):
                        self._graph_out = self.model(self._d_in)
                self._graph = graph
            except RuntimeError as exc:
                self._graph = self._graph_out = None
                self.use_graphs = False
                self.notes.append(f"CUDA graph capture failed ({_first_line(exc)}); measured eagerly")
        self._finish_prepare()

    def _launch(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            self._d_out = self._graph_out
        else:
            with self._torch.inference_mode():
                self._d_out = self.model(self._d_in)

    def _device_out(self):
        return self._d_out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"channels_last": self.options.channels_last, "cuda_graph": self._graph is not None}
        return d


# ----------------------------------------------------------------------------- ONNX Runtime

_ORT_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def onnx_io_info(path: Path) -> dict[str, Any]:
    """Input name/shape and the dominant floating-point type of the weights of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors have many types
        raise GslimError(f"cannot read ONNX file {path}: {_first_line(exc)}") from exc
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise GslimError(f"{path} has {len(inputs)} inputs; gslim profiles single-input image classifiers")
    dims: list[Any] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    counts: dict[int, int] = {}
    for t in graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            n = 1
            for d in t.dims:
                n *= d
            counts[t.data_type] = counts.get(t.data_type, 0) + n
    weight_type = max(counts, key=counts.get) if counts else onnx.TensorProto.FLOAT
    weights = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
               onnx.TensorProto.BFLOAT16: "bf16"}[weight_type]
    if any(n.op_type == "DequantizeLinear" for n in graph.node):
        weights = "int8"  # a Q/DQ file (gslim export --int8): its convolutions run on INT8 weights
    return {"input": inputs[0].name, "dims": dims, "weights": weights,
            "outputs": [o.name for o in graph.output]}


#: ops that only compute shapes: ONNX Runtime may keep them on the CPU next to a GPU EP
SHAPE_OPS = frozenset({"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape",
                       "ConstantOfShape", "Range", "Expand", "Identity", "Flatten", "Constant"})


def node_placement(profile: Path) -> dict[str, tuple[str, str]]:
    """node name -> (op type, execution provider), from an ONNX Runtime profile (JSON trace)."""
    import json

    try:
        events = json.loads(Path(profile).read_text())
    except (OSError, ValueError) as exc:
        raise GslimError(f"cannot read ONNX Runtime's profile {profile}: {exc}") from exc
    out: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and "op_name" in args:
            name = str(e.get("name", "")).removesuffix("_kernel_time").removesuffix("_fence_before")
            name = name.removesuffix("_fence_after")
            out[name] = (str(args["op_name"]), str(args["provider"]))
    return out


def check_placement(placement: dict[str, tuple[str, str]], allowed: tuple[str, ...], backend: str) -> dict:
    """Counts per provider; raises :class:`BackendUnavailable` when a compute node runs elsewhere
    than ``allowed`` (shape-only ops on the CPU are counted, not refused)."""
    if not placement:
        raise BackendUnavailable(f"{backend}: ONNX Runtime's profile lists no node placement; cannot tell "
                                 "where the model ran")
    counts: dict[str, int] = {}
    stray = []
    shape_on_cpu = 0
    for name, (op, provider) in placement.items():
        counts[provider] = counts.get(provider, 0) + 1
        if provider in allowed:
            continue
        if provider == "CPUExecutionProvider" and op in SHAPE_OPS:
            shape_on_cpu += 1
        else:
            stray.append((op, name, provider))
    if stray:
        ops = sorted({op for op, _, _ in stray})
        raise BackendUnavailable(
            f"{backend}: {len(stray)} compute node(s) ran outside {'/'.join(allowed)} ({stray[0][2]}: "
            f"{', '.join(ops[:5])}); a number under this name would not be {backend}")
    return {"providers": counts, "cpu_shape_nodes": shape_on_cpu}


def loaded_libnvinfer_major() -> Optional[int]:
    """The TensorRT major this process has loaded (libnvinfer.so.N in /proc/self/maps), if any."""
    import re

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = {int(m) for m in re.findall(r"libnvinfer\.so\.(\d+)", maps)}
    return max(found) if found else None


def has_fast_fp16(capability: tuple[int, int]) -> bool:
    """TensorRT's ``platformHasFastFp16``: true on sm_53, sm_60, sm_62 and sm_70 and newer;
    false on the other Maxwell/Pascal parts (sm_61 runs FP16 at 1/64 rate)."""
    major, minor = capability
    return major >= 7 or (major, minor) in ((5, 3), (6, 0), (6, 2))


class _OrtBackend(Backend):
    artifact = "onnx"
    runtime = "onnxruntime"
    provider: ClassVar[str] = "CPUExecutionProvider"

    @classmethod
    def _ort_available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime; onnxruntime-gpu for CUDA)"
        providers = ort.get_available_providers()
        if cls.provider not in providers:
            return False, (f"{cls.provider} is not in this onnxruntime build "
                           f"(it has {', '.join(providers)}); install onnxruntime-gpu")
        return True, ""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return cls._ort_available()

    def _session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def _providers(self) -> list:
        return ["CPUExecutionProvider"]

    def _open_session(self) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.info = onnx_io_info(self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), self._session_options(),
                                                providers=self._providers())
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Exception subclasses
            raise GslimError(f"{self.name}: onnxruntime cannot load {self.path}: {_first_line(exc)}") from exc
        active = self.session.get_providers()
        if not active or active[0] != self.provider:
            raise BackendUnavailable(
                f"{self.name}: {self.provider} did not initialise (onnxruntime fell back to "
                f"{active[0] if active else 'nothing'}); check the CUDA/TensorRT libraries"
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.in_dtype = _ORT_NP.get(inp.type)
        if self.in_dtype is None:
            raise GslimError(f"{self.path}: input type {inp.type} is not a floating-point image tensor")
        shape = list(inp.shape)
        if len(shape) != 4:
            raise GslimError(f"{self.path}: expected an NCHW image input, got shape {shape}")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            self.input_hw = (h, w)
        elif self.options.input_size:
            self.input_hw = (self.options.input_size, self.options.input_size)

    def deactivate(self) -> None:
        self.session = None
        self._feed = None

    @property
    def precision(self) -> str:
        return getattr(self, "info", {}).get("weights", "fp32")

    def _check_batch(self, batch_size: int) -> None:
        if self.fixed_batch is not None and batch_size != self.fixed_batch:
            raise BatchUnsupported(f"{self.path.name} has a fixed batch of {self.fixed_batch} "
                                   "(export with a dynamic batch axis)")

    def _run_host(self, x):
        """Run on a host array in chunks that fit a fixed batch (padding the last one)."""
        import numpy as np

        x = _as_numpy(x, self.in_dtype)
        n = x.shape[0]
        if self.fixed_batch is None:
            return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)
        outs = []
        for a, b in _chunks(n, self.fixed_batch):
            part = x[a:b]
            if part.shape[0] < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - part.shape[0], *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            out = self.session.run([self.output_name], {self.input_name: part})[0]
            outs.append(np.asarray(out[: b - a], dtype=np.float32))
        return np.concatenate(outs)

    def infer(self, batch: Any):
        return self._run_host(batch)

    def runtime_info(self) -> dict[str, Any]:
        d = super().runtime_info()
        session = getattr(self, "session", None)
        d["providers"] = session.get_providers() if session is not None else [self.provider]
        return d


class OrtCPU(_OrtBackend):
    """ONNX Runtime CPU EP: ``intra_op_num_threads=threads``, one inter-op thread, sequential."""

    name = "ort-cpu"
    device = "cpu"
    provider = "CPUExecutionProvider"

    def activate(self) -> None:
        self._open_session()
        if self.options.fp16 and self.precision == "fp32":
            self.notes.append("fp16 is not used on the CPU; measured in fp32")

    def prepare(self, batch_size: int) -> None:
        self._check_batch(batch_size)
        self.batch = batch_size
        x = random_input(self._stage_shape(batch_size), self.in_dtype, self.options.seed)
        self._feed = {self.input_name: x}
        self._out_names = [self.output_name]

    def run(self) -> None:
        self.session.run(self._out_names, self._feed)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"intra_op_num_threads": self.options.threads, "inter_op_num_threads": 1,
                        "execution_mode": "sequential"}
        return d


class OrtCUDA(_CudaTimed, _OrtBackend):
    """ONNX Runtime CUDA EP with IO binding to torch CUDA buffers, on a stream we time with events."""

    name = "ort-cuda"
    device = "cuda"
    provider = "CUDAExecutionProvider"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, reason = cls._ort_available()
        if not ok:
            return ok, reason
        return _torch_cuda_available()

    def _cuda_provider(self) -> tuple[str, dict[str, Any]]:
        return ("CUDAExecutionProvider", {
            "device_id": self.options.device_id,
            "user_compute_stream": str(self._stream.cuda_stream),
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        })

    def _providers(self) -> list:
        return [self._cuda_provider(), "CPUExecutionProvider"]

    def activate(self) -> None:
        self._init_cuda(self.options.device_id)
        self._profile_dir = tempfile.mkdtemp(prefix="gslim-ort-")  # the placement profile (_check_placement)
        self._open_session()
        self._check_placement()
        self._binding = None
        self._run_options = self._ort.RunOptions()
        # let Run return once the work is enqueued, so the end event follows the last kernel
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def deactivate(self) -> None:
        import shutil

        self._binding = None
        _OrtBackend.deactivate(self)
        self._free_cuda()
        if self._profile_dir:
            shutil.rmtree(self._profile_dir, ignore_errors=True)

    def prepare(self, batch_size: int) -> None:
        import numpy as np

        torch = self._torch
        self._check_batch(batch_size)
        self.batch = batch_size
        tdtype = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}[self.in_dtype]
        shape = self._stage_shape(batch_size)
        self._stage_input(shape, tdtype)
        dev_id = self.options.device_id
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", dev_id, np.dtype(self.in_dtype), list(shape),
                           self._d_in.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev_id)  # ORT allocates once to reveal the shape
        self.session.run_with_iobinding(binding)
        ort_out = binding.get_outputs()[0]
        out_shape, out_dtype = ort_out.shape(), _ORT_NP.get(ort_out.data_type(), "float32")
        tout = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}[out_dtype]
        self._d_out = torch.empty(out_shape, dtype=tout, device=self._dev)
        binding.clear_binding_outputs()
        binding.bind_output(self.output_name, "cuda", dev_id, np.dtype(out_dtype), list(out_shape),
                            self._d_out.data_ptr())
        self._binding = binding
        self._finish_prepare()

    def _launch(self) -> None:
        self.session.run_with_iobinding(self._binding, self._run_options)

    def _device_out(self):
        return self._d_out

    #: the providers a node may run on for the number to carry this backend's name
    allowed_providers: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider",)
    _profile_dir: Optional[str] = None

    def _session_options(self):
        so = super()._session_options()
        # one profiled run in activate() tells where ONNX Runtime placed every node
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(self._profile_dir) / "placement")
        return so

    def _check_placement(self) -> None:
        """Run once, read the node placement from ONNX Runtime's profile, and refuse to report
        a number under this backend's name when compute nodes fell back to the CPU."""
        x = random_input(self._stage_shape(self.fixed_batch or 1), self.in_dtype or "float32")
        self.session.run(None, {self.input_name: x})
        profile = Path(self.session.end_profiling())
        self.placement = check_placement(node_placement(profile), self.allowed_providers, self.name)
        if self.placement["cpu_shape_nodes"]:
            self.notes.append(f"{self.placement['cpu_shape_nodes']} shape-only node(s) on the CPU "
                              "(ONNX Runtime keeps shape arithmetic there)")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"io_binding": True, "cudnn_conv_algo_search": "EXHAUSTIVE"}
        d["placement"] = getattr(self, "placement", None)
        return d


class OrtTensorRT(OrtCUDA):
    """ONNX Runtime's TensorRT EP (CUDA EP as fallback), with engine and timing caches."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    # subgraphs TensorRT cannot take run on the CUDA EP: still the GPU, and listed in placement
    allowed_providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def _providers(self) -> list:
        opts: dict[str, Any] = {
            "device_id": self.options.device_id,
            "user_compute_stream": str(self._stream.cuda_stream),
            "trt_fp16_enable": bool(self.options.fp16),
            "trt_engine_cache_enable": True,
            "trt_timing_cache_enable": True,
        }
        if self.options.cache_dir is not None:
            cache = Path(self.options.cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            opts["trt_engine_cache_path"] = str(cache)
            opts["trt_timing_cache_path"] = str(cache)
        dims = self._pre_info["dims"]
        if len(dims) == 4 and not (isinstance(dims[0], int) and dims[0] > 0):
            # dynamic batch: one optimisation profile covering the timed and the scoring batches
            h, w = dims[2], dims[3]
            if not (isinstance(h, int) and h > 0):
                h = w = self.options.input_size
            name = self._pre_info["input"]
            lo, hi = 1, max(1, self.options.max_batch)
            opt = min(max(lo, self.options.opt_batch), hi)
            opts["trt_profile_min_shapes"] = f"{name}:{lo}x3x{h}x{w}"
            opts["trt_profile_opt_shapes"] = f"{name}:{opt}x3x{h}x{w}"
            opts["trt_profile_max_shapes"] = f"{name}:{hi}x3x{h}x{w}"
        return [("TensorrtExecutionProvider", opts), self._cuda_provider(), "CPUExecutionProvider"]

    def activate(self) -> None:
        self._pre_info = onnx_io_info(self.path)
        super().activate()
        self._built_precision = self._fp16_truth() if self.options.fp16 else None

    def _fp16_truth(self) -> str:
        """What ``trt_fp16_enable`` really gives. ONNX Runtime's TensorRT EP turns FP16 off on
        a GPU without fast FP16 (``platformHasFastFp16()`` false: it logs a warning and builds
        FP32), and TensorRT 11 has no FP16 builder flag at all (strongly typed networks take
        their precision from the ONNX). Either way the engine is not FP16: say so."""
        major = loaded_libnvinfer_major()
        if major is not None and major >= 11:
            raise BackendUnavailable(
                f"{self.name}: this onnxruntime's TensorRT EP runs TensorRT {major}, where trt_fp16_enable builds "
                "FP32 (strongly typed); profile an FP16 ONNX (gslim export --fp16-onnx) instead of --fp16")
        cc = self._torch.cuda.get_device_capability(self._dev)
        if not has_fast_fp16(cc):
            raise BackendUnavailable(
                f"{self.name}: this GPU (sm_{cc[0]}{cc[1]}) has no fast FP16, so TensorRT builds FP32 despite "
                "trt_fp16_enable; profile without --fp16")
        return "fp16" if major is not None else "fp16 (TensorRT version not seen in this process)"

    @property
    def precision(self) -> str:
        built = getattr(self, "_built_precision", None)
        if built:
            return built
        return "fp16 (requested)" if self.options.fp16 else super().precision

    def _check_batch(self, batch_size: int) -> None:
        super()._check_batch(batch_size)
        if self.fixed_batch is None and batch_size > self.options.max_batch:
            raise BatchUnsupported(f"batch {batch_size} is above the TensorRT profile's maximum "
                                   f"{self.options.max_batch}")

    def _run_host(self, x):
        import numpy as np

        x = _as_numpy(x)
        if self.fixed_batch is None and x.shape[0] > self.options.max_batch:
            return np.concatenate([super(OrtTensorRT, self)._run_host(x[a:b])
                                   for a, b in _chunks(x.shape[0], self.options.max_batch)])
        return super()._run_host(x)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"io_binding": True, "trt_fp16_enable": bool(self.options.fp16),
                        "engine_cache": str(self.options.cache_dir) if self.options.cache_dir else "cwd",
                        "timing_cache": True}
        return d


# ----------------------------------------------------------------------------- TensorRT


class TensorRT(_CudaTimed, Backend):
    """A serialized TensorRT engine run with ``execute_async_v3`` on torch CUDA buffers.

    CUDA graphs are used where capture works (the default; ``cuda_graphs=False`` turns them
    off); a failed capture falls back to plain enqueues and says so in the notes.
    """

    name = "trt"
    artifact = "engine"
    device = "cuda"
    runtime = "tensorrt"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "tensorrt is not installed (pip install tensorrt; needs an NVIDIA GPU)"
        except Exception as exc:  # noqa: BLE001 - a broken install raises OSError etc.
            return False, f"tensorrt cannot be imported: {_first_line(exc)}"
        return _torch_cuda_available()

    def _torch_dtype(self, trt_dtype: Any):
        trt, torch = self._trt, self._torch
        table = {}
        for t_name, torch_dt in (("float32", torch.float32), ("float16", torch.float16),
                                 ("bfloat16", torch.bfloat16), ("int8", torch.int8), ("int32", torch.int32),
                                 ("int64", torch.int64), ("bool", torch.bool), ("uint8", torch.uint8)):
            if hasattr(trt, t_name):
                table[getattr(trt, t_name)] = torch_dt
        if trt_dtype not in table:
            raise GslimError(f"{self.path}: unsupported TensorRT tensor type {trt_dtype}")
        return table[trt_dtype]

    def activate(self) -> None:
        import tensorrt as trt

        self._trt = trt
        self._init_cuda(self.options.device_id)
        from gslim.export.tensorrt import _logger

        self._logger = _logger(trt)  # gslim's one logger: TensorRT keeps the first a process makes
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise GslimError(f"trt: cannot deserialize {self.path}: it was built by another TensorRT version "
                             f"(this is {trt.__version__}) or for another GPU; rebuild it with gslim export")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self._inputs) != 1 or not self._outputs:
            raise GslimError(f"{self.path}: expected one input and at least one output, got "
                             f"{len(self._inputs)} input(s) and {len(self._outputs)} output(s)")
        self.input_name = self._inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if len(shape) != 4:
            raise GslimError(f"{self.path}: expected an NCHW image input, got shape {shape}")
        self._in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        if shape[0] == -1:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        if shape[2] > 0 and shape[3] > 0:
            self.input_hw = (int(shape[2]), int(shape[3]))
        elif self.options.input_size:
            self.input_hw = (self.options.input_size, self.options.input_size)
        self._graph = None
        self._outs = {}
        self.use_graphs = self.options.cuda_graphs is not False

    def deactivate(self) -> None:
        self._graph = None
        self._outs = None
        self.context = None
        self.engine = None
        self._runtime = None
        self._free_cuda()

    @property
    def precision(self) -> str:
        torch = getattr(self, "_torch", None)
        io = ""
        if torch is not None:
            io = {torch.float16: "fp16", torch.float32: "fp32"}.get(getattr(self, "_in_dtype", None), "")
        hint = self.options.precision_hint
        return hint if hint else (f"as built ({io} I/O)" if io else "as built")

    def _bind(self, d_in) -> dict[str, Any]:
        """Set the input shape and addresses; allocate the outputs. Returns the output tensors."""
        b = int(d_in.shape[0])
        if not self.min_batch <= b <= self.max_batch:
            raise BatchUnsupported(f"batch {b} is outside the engine's profile "
                                   f"[{self.min_batch}, {self.max_batch}] (rebuild with a larger max_batch)")
        if not self.context.set_input_shape(self.input_name, tuple(d_in.shape)):
            raise BatchUnsupported(f"the engine rejects the input shape {tuple(d_in.shape)}")
        from gslim.export.tensorrt import bind_address

        bind_address(self.context, self.input_name, d_in.data_ptr())
        outs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = self._torch.empty(shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)),
                                           device=self._dev)
            bind_address(self.context, name, outs[name].data_ptr())
        return outs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise GslimError(f"trt: execute_async_v3 failed for {self.path}")

    def infer(self, batch: Any):
        import numpy as np

        torch = self._torch
        self._graph = None  # rebinding invalidates a captured graph; prepare() recaptures
        x = torch.as_tensor(_as_numpy(batch, "float32"))
        results = []
        for a, b in _chunks(x.shape[0], self.max_batch):
            part = x[a:b]
            n = part.shape[0]
            if n < self.min_batch:
                part = torch.cat([part, part.new_zeros((self.min_batch - n, *part.shape[1:]))])
            with torch.cuda.stream(self._stream):
                d_in = part.to(self._dev, dtype=self._in_dtype)
                outs = self._bind(d_in)
                self._enqueue()
                out = outs[self._outputs[0]].float().cpu()
            self._stream.synchronize()
            results.append(out[:n].numpy())
        if getattr(self, "_d_in", None) is not None and self._outs:
            # point the context back at the prepared buffers: the temporaries above are freed
            # now, and a later run() without prepare() must not enqueue into them
            self._outs = self._bind(self._d_in)
        return np.concatenate(results)

    def prepare(self, batch_size: int) -> None:
        torch = self._torch
        if not self.min_batch <= batch_size <= self.max_batch:
            raise BatchUnsupported(f"batch {batch_size} is outside the engine's profile "
                                   f"[{self.min_batch}, {self.max_batch}]")
        self.batch = batch_size
        self._graph = None
        self._stage_input(self._stage_shape(batch_size), self._in_dtype)
        self._outs = self._bind(self._d_in)
        with torch.cuda.stream(self._stream):
            self._enqueue()  # first enqueue does shape-dependent setup outside any capture
        self._stream.synchronize()
        if self.use_graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                    self._enqueue()
                self._graph = graph
            except (RuntimeError, GslimError) as exc:
                self._graph = None
                self.use_graphs = False
                self.notes.append(f"CUDA graph capture failed ({_first_line(exc)}); "
                                  "measured with plain enqueues")
        self._finish_prepare()

    def _launch(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._enqueue()

    def _device_out(self):
        return self._outs[self._outputs[0]]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {"cuda_graph": self._graph is not None if self.active else self.use_graphs,
                        "profile_batch": [getattr(self, "min_batch", None), getattr(self, "max_batch", None)]}
        return d


# ----------------------------------------------------------------------------- registry

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (TorchCPU, TorchCUDA, OrtCPU, OrtCUDA, OrtTensorRT, TensorRT)
}


def get_backend(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise GslimError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def availability() -> dict[str, tuple[bool, str]]:
    """Every backend's ``available()`` answer (cheap: imports only what each needs)."""
    return {name: cls.available() for name, cls in BACKENDS.items()}
