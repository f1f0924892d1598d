"""TensorRT engines from the exported ONNX: build (10.x and 11.x), run, and check parity.

``tensorrt`` is imported lazily: without it, asking for an engine raises
:class:`~gslim.errors.MissingDependencyError` with the install hint, and nothing else in
gslim is affected. Device buffers are torch CUDA tensors (``data_ptr()`` goes to
``set_tensor_address``), so neither pycuda nor cuda-python is needed.

Precision differs by major version:

* FP32/FP16 on TensorRT 10.x: a weakly typed network from the FP32 ONNX, reduced precision
  enabled with ``BuilderFlag.FP16``.
* FP32/FP16 on TensorRT 11.x, which removed those flags: every network is strongly typed, so
  precision lives in the ONNX. FP16 builds from the FP16 ONNX (FP32 I/O, made with
  :func:`gslim.export.onnx.convert_fp16` when not given).
* INT8, one path for both: the Q/DQ ONNX that ``gslim export --int8`` writes
  (:mod:`gslim.export.int8`), parsed into a strongly typed network (the
  ``STRONGLY_TYPED`` creation flag on 10.x, the only mode on 11.x) with no precision flags:
  "Use explicit quantization with Strong Typing. Precision-control build flags are not
  required and should not be specified" (TensorRT developer guide, Explicit Quantization).
  The implicit calibrators (deprecated in 10.1, removed in 11) are not used.

A request for FP16 never silently yields an FP32 engine: on 10.x the builder must report
fast FP16 (``platform_has_fast_fp16``), on 11.x the network parsed must carry FP16 tensors.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from gslim.artifacts import atomic_write
from gslim.errors import GslimError, MissingDependencyError

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = (
    "pip install 'gslim[gpu]' "
    "(on Jetson, TensorRT comes with JetPack: sudo apt-get install python3-libnvinfer)"
)
#: Engine vs ONNX Runtime FP32, relative to max(1, max|logit|). FP32 engines are built
#: without TF32 (true FP32; kernels and fusions still differ from ORT's), FP16 engines may
#: also accumulate in FP16 in some tactics, hence twice the FP16-ONNX tolerance. INT8 logits
#: differ by design: its gate is top-1 agreement with the FP32 model.
ENGINE_TOLERANCES: dict[str, Optional[float]] = {"fp32": 1e-3, "fp16": 2e-2, "int8": None}
ENGINE_MIN_TOP1: dict[str, Optional[float]] = {"fp32": None, "fp16": None, "int8": 0.9}


def import_tensorrt():
    """The ``tensorrt`` module, or a MissingDependencyError that says what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but its shared libraries are not loadable
        raise MissingDependencyError(f"TensorRT cannot load its libraries ({exc}): {INSTALL_HINT}") from exc
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except MissingDependencyError:
        return False
    return True


def trt_major(trt=None) -> int:
    trt = trt or import_tensorrt()
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError as exc:
        raise GslimError(f"cannot read the TensorRT version {trt.__version__!r}") from exc


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "TensorRT needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)"
        )


def require_engine_support() -> tuple[Any, int]:
    """Fail early (before any export work) when an engine cannot be built here."""
    trt = import_tensorrt()
    major = trt_major(trt)
    if major < 10:
        raise MissingDependencyError(f"gslim needs TensorRT >= 10, found {trt.__version__}: {INSTALL_HINT}")
    require_cuda()
    return trt, major


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


_LOGGERS: dict[int, Any] = {}


def _logger(trt):
    """gslim's one capturing ILogger for this TensorRT module: keeps errors (for one-line
    messages) and the first warnings.

    TensorRT keeps the logger of the first builder or runtime a process creates and hands it
    every later one's messages too, so gslim uses a single instance everywhere (builds, the
    parity runner, the profiler): then its own errors always reach it. INFO and VERBOSE
    messages return at once, before any string work. Errors are read per operation through
    :meth:`mark` / ``first_error(since=...)``.
    """
    key = id(trt)
    if key in _LOGGERS:
        return _LOGGERS[key]

    class _CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self._error = int(trt.ILogger.Severity.ERROR)
            self._warning = int(trt.ILogger.Severity.WARNING)

        def log(self, severity, msg) -> None:
            sev = int(severity)
            if sev > self._warning:  # INFO, VERBOSE
                return
            if sev <= self._error:
                self.errors.append(str(msg).strip())
                del self.errors[:-50]
            elif len(self.warnings) < 20:
                self.warnings.append(str(msg).strip())

        def mark(self) -> int:
            return len(self.errors)

        def first_error(self, default: str, since: int = 0) -> str:
            for err in self.errors[since:]:
                line = next((ln.strip() for ln in err.splitlines() if ln.strip()), "")
                if line:
                    return line
            return f"{default} (TensorRT reported no error text to gslim's logger)"

    _LOGGERS[key] = _CaptureLogger()
    return _LOGGERS[key]


def bind_address(context, name: str, ptr: int) -> None:
    """``set_tensor_address``, whose False return (wrong name, misaligned pointer) would
    otherwise leave the engine reading or writing a stale buffer."""
    if not context.set_tensor_address(name, int(ptr)):
        raise GslimError(f"TensorRT refused the device address of tensor {name!r}")


# --------------------------------------------------------------------------- build


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_mb: int = 2048,
    optimization_level: int = 3,
    timing_cache: Optional[Path] = None,
    dla_core: Optional[int] = None,
    fp16_onnx: Optional[Path] = None,
    int8_onnx: Optional[Path] = None,
    tf32: bool = False,
) -> dict:
    """Build and atomically write a serialized engine; return what was built (a JSON-able dict).

    ``min/opt/max_batch`` form the optimization profile of a dynamic batch (ignored for a
    static-batch ONNX). ``timing_cache`` is read when it exists and written back after the
    build, so repeated builds skip kernel timing. ``fp16_onnx`` is the FP16 ONNX to use on
    TensorRT >= 11 (made on the fly if None); ``int8_onnx`` the Q/DQ ONNX an INT8 engine is built
    from (``onnx_path`` itself when it already has Q/DQ nodes).
    """
    trt, major = require_engine_support()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise GslimError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not onnx_path.is_file():
        raise GslimError(f"ONNX file not found: {onnx_path}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise GslimError(
            f"the batch profile needs 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}"
        )
    check_dla_support(major, dla_core)
    if dla_core is not None and precision == "fp32":
        raise GslimError("DLA runs FP16 or INT8 only: pass --precision fp16 or int8 with --dla-core")


    info: dict[str, Any] = {
        "path": str(engine_path),
        "tensorrt": str(trt.__version__),
        "precision": precision,
        "device": _device_name(),
        "workspace_mb": workspace_mb,
        "optimization_level": optimization_level,
        "dla_core": dla_core,
    }
    logger = _logger(trt)
    since = logger.mark()
    with _scratch_dir(engine_path) as scratch:
        source = onnx_path
        builder = trt.Builder(logger)
        config = builder.create_builder_config()
        strongly_typed = False
        if precision == "int8":
            source = _qdq_source(onnx_path, int8_onnx)
            network, strongly_typed = _qdq_network(trt, builder, major)
            mode = "strongly-typed Q/DQ ONNX"
        elif major >= 11:
            # Strongly typed always (the STRONGLY_TYPED creation flag is deprecated and ignored).
            source, mode = _typed_source_v11(precision, onnx_path, fp16_onnx, scratch)
            network = builder.create_network(0)
        else:
            network = builder.create_network(0)
            mode = None  # decided after parsing, when the network is known
        info["onnx"] = str(source) if scratch not in source.parents else f"{source.name} (temporary)"

        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
            first = errors[0].splitlines()[0] if errors else logger.first_error("unknown parser error", since)
            raise GslimError(f"TensorRT cannot parse {source.name}: {first}")
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise GslimError(f"{source.name} must have one input and one output for gslim's engine builder")
        inp = network.get_input(0)
        shape = tuple(int(d) for d in inp.shape)
        info["input"] = {"name": inp.name, "shape": list(shape)}

        if shape[0] == -1:
            profile = builder.create_optimization_profile()
            dims = shape[1:]
            profile.set_shape(inp.name, (min_batch, *dims), (opt_batch, *dims), (max_batch, *dims))
            config.add_optimization_profile(profile)
            info["profile"] = {"min": min_batch, "opt": opt_batch, "max": max_batch}
        else:
            info["profile"] = {"static_batch": shape[0]}

        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        config.builder_optimization_level = int(optimization_level)

        if major >= 11 or strongly_typed:
            if precision == "fp16" and not _network_has_half(trt, network):
                raise GslimError(
                    f"{source.name} parsed without FP16 tensors; refusing to build an FP32 engine for fp16"
                )
        else:
            mode = _configure_precision_weak(trt, builder, config, precision)
        if precision == "fp32" and not tf32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means FP32 math, not TF32 tensor cores
        info["mode"] = mode
        info["tf32"] = bool(tf32) if precision == "fp32" else None

        if dla_core is not None:
            _configure_dla(trt, builder, config, dla_core)

        cache_loaded = _load_timing_cache(config, timing_cache)
        info["timing_cache"] = {"path": str(timing_cache), "reused": cache_loaded} if timing_cache else None

        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        info["build_s"] = round(time.perf_counter() - start, 2)
        if serialized is None:
            raise GslimError(
                f"TensorRT could not build the engine: {logger.first_error('see the TensorRT log', since)}"
            )
        data = bytes(memoryview(serialized))
        atomic_write(engine_path, lambda tmp: tmp.write_bytes(data))
        info["bytes"] = len(data)
        if timing_cache is not None:
            cache = config.get_timing_cache()
            if cache is not None:
                blob = bytes(memoryview(cache.serialize()))
                atomic_write(Path(timing_cache), lambda tmp: tmp.write_bytes(blob))
    info["warnings"] = logger.warnings[:5]
    return info


def _typed_source_v11(precision: str, onnx_path: Path, fp16_onnx: Optional[Path], scratch: Path) -> tuple[Path, str]:
    """The ONNX that carries an FP32/FP16 precision on TensorRT >= 11 (strong typing)."""
    from gslim.export.onnx import convert_fp16, has_float16

    if precision == "fp32":
        return onnx_path, "strongly-typed FP32 ONNX"
    if fp16_onnx is not None:
        if not has_float16(Path(fp16_onnx)):
            raise GslimError(f"{fp16_onnx} has no FP16 tensors; cannot build an FP16 engine from it")
        return Path(fp16_onnx), "strongly-typed FP16 ONNX"
    if has_float16(onnx_path):
        return onnx_path, "strongly-typed FP16 ONNX"
    out = convert_fp16(onnx_path, scratch / f"{onnx_path.stem}.fp16.onnx")
    return out, "strongly-typed FP16 ONNX (converted with onnxconverter-common)"


def _qdq_source(onnx_path: Path, int8_onnx: Optional[Path]) -> Path:
    """The Q/DQ ONNX an INT8 engine is built from."""
    from gslim.export.onnx import has_qdq

    source = Path(int8_onnx) if int8_onnx is not None else onnx_path
    if not source.is_file():
        raise GslimError(f"INT8 ONNX not found: {source}")
    if not has_qdq(source):
        raise GslimError(
            f"{source.name} has no Q/DQ nodes: INT8 engines are built from a Q/DQ ONNX "
            "(gslim export MODEL.pt --int8 writes model.int8.onnx; pass it, or --engine with --precision int8)"
        )
    return source


def _qdq_network(trt, builder, major: int):
    """A strongly typed network for a Q/DQ ONNX (the creation flag on 10.x; 11.x has only that mode
    and deprecated the flag)."""
    if major >= 11:
        return builder.create_network(0), True
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)), True


def _network_has_half(trt, network) -> bool:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


def _configure_precision_weak(trt, builder, config, precision: str) -> str:
    """Precision flags of a weakly typed network (TensorRT 10.x FP32/FP16)."""
    if precision == "fp32":
        return "weakly-typed FP32"
    fast_fp16 = bool(getattr(builder, "platform_has_fast_fp16", True))
    if precision == "fp16":
        if not fast_fp16:
            raise GslimError(
                "this GPU has no fast FP16 (builder.platform_has_fast_fp16 is False); "
                "refusing to build an FP32 "
                "engine for --precision fp16 (use --precision fp32)"
            )
    config.set_flag(trt.BuilderFlag.FP16)
    return "weakly-typed, BuilderFlag.FP16"


def check_dla_support(major: int, dla_core: Optional[int]) -> None:
    """DLA exists on TensorRT 10.x (JetPack 6); TensorRT 11 releases do not support it
    (TensorRT 11.3 developer guide, "Strongly Typed Networks for DLA": "DLA is not supported in
    TensorRT 11.3.0 ... DLA was also not supported in TensorRT 11.0, 11.1, or 11.2")."""
    if dla_core is not None and major >= 11:
        raise GslimError(f"--dla-core needs TensorRT 10.x (JetPack): TensorRT {major}.x does not support DLA")


def _configure_dla(trt, builder, config, dla_core: int) -> None:
    cores = int(getattr(builder, "num_DLA_cores", 0))
    if dla_core >= cores:
        raise GslimError(f"--dla-core {dla_core} requested but this device has {cores} DLA core(s)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = int(dla_core)
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU


def _load_timing_cache(config, path: Optional[Path]) -> bool:
    """Attach a timing cache (the file's content when it exists); True when one was reused."""
    if path is None:
        return False
    p = Path(path)
    blob = p.read_bytes() if p.is_file() else b""
    cache = config.create_timing_cache(blob)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return bool(blob)
    # a cache from another GPU or TensorRT version: start a fresh one (it is rewritten after the build)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


@contextlib.contextmanager
def _scratch_dir(near: Path) -> Iterator[Path]:
    parent = near.parent if str(near.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{near.name}.", suffix=".scratch", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- run


class TrtRunner:
    """A deserialized engine as a context manager: ``with TrtRunner(p) as r: r.infer(x)``.

    Input and output live in torch CUDA tensors whose ``data_ptr()`` is handed to
    ``set_tensor_address``; ``execute_async_v3`` runs on a private CUDA stream.
    """

    def __init__(self, engine_path: Path, *, dla_core: Optional[int] = None):
        self.path = Path(engine_path)
        self.dla_core = dla_core
        self.input_name = self.output_name = ""
        self.static_batch: Optional[int] = None
        self.min_batch, self.opt_batch, self.max_batch = 1, 1, 1
        self._engine = self._context = self._runtime = self._stream = None

    def __enter__(self) -> "TrtRunner":
        trt, _ = require_engine_support()
        import torch

        if not self.path.is_file():
            raise GslimError(f"engine not found: {self.path}")
        self._trt = trt
        self._logger = _logger(trt)
        since = self._logger.mark()
        check_dla_support(trt_major(trt), self.dla_core)
        self._runtime = trt.Runtime(self._logger)
        if self.dla_core is not None:
            self._runtime.DLA_core = int(self.dla_core)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise GslimError(
                f"TensorRT cannot load {self.path}: "
                + self._logger.first_error("built by another TensorRT or GPU?", since)
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise GslimError(f"TensorRT could not create an execution context for {self.path}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise GslimError(
                f"{self.path} must have one input and one output (has {len(ins)} and {len(outs)})"
            )
        self.input_name, self.output_name = ins[0], outs[0]
        shape = tuple(int(d) for d in self._engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:
            mn, opt, mx = self._engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.opt_batch, self.max_batch = int(mn[0]), int(opt[0]), int(mx[0])
        else:
            self.static_batch = self.min_batch = self.opt_batch = self.max_batch = shape[0]
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.input_name))
        self._out_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.output_name))
        self._stream = torch.cuda.Stream()
        return self

    def __exit__(self, *exc) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    def infer(self, x) -> np.ndarray:
        import torch

        if self._context is None:
            raise RuntimeError("TrtRunner.infer called outside its 'with' block")
        b = int(x.shape[0])
        if not self.min_batch <= b <= self.max_batch:
            raise GslimError(
                f"batch {b} is outside the engine's profile [{self.min_batch}, {self.max_batch}]"
            )
        with torch.cuda.stream(self._stream):
            inp = torch.as_tensor(x).to("cuda", dtype=self._in_dtype, non_blocking=False).contiguous()
            if not self._context.set_input_shape(self.input_name, tuple(inp.shape)):
                raise GslimError(f"the engine rejects input shape {tuple(inp.shape)}")
            out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))
            out = torch.empty(out_shape, dtype=self._out_dtype, device="cuda")
            bind_address(self._context, self.input_name, inp.data_ptr())
            bind_address(self._context, self.output_name, out.data_ptr())
            since = self._logger.mark()
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise GslimError(
                    "TensorRT execution failed: "
                    + self._logger.first_error("execute_async_v3 returned False", since)
                )
        self._stream.synchronize()
        return out.float().cpu().numpy()


def _torch_dtype(trt, dtype):
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
    }
    for name, td in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return td
    raise GslimError(f"unsupported engine I/O data type {dtype}")


def engine_parity(
    engine_path: Path,
    onnx_path: Path,
    images: "torch.Tensor",  # noqa: F821
    *,
    precision: str,
    tolerance: Optional[float] = None,
    min_top1: Optional[float] = None,
    batch_size: Optional[int] = None,
    raise_on_fail: bool = True,
    dla_core: Optional[int] = None,
) -> dict:
    """Compare the engine with ONNX Runtime (CPU, FP32 ONNX) on ``images``.

    ``tolerance`` is relative to max(1, max|logit|), default per precision
    (:data:`ENGINE_TOLERANCES`); ``min_top1`` gates top-1 agreement (default 0.9 for INT8).
    """
    from gslim.export.parity import OrtRunner, batch_plan, compare, finish_report, run_plan

    if precision not in PRECISIONS:
        raise GslimError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tol = ENGINE_TOLERANCES[precision] if tolerance is None else tolerance
    top1 = ENGINE_MIN_TOP1[precision] if min_top1 is None else min_top1
    images = images.detach().cpu().float().contiguous()
    with TrtRunner(Path(engine_path), dla_core=dla_core) as trt_runner:
        plan = batch_plan(
            images.shape[0],
            batch_size or trt_runner.opt_batch,
            trt_runner.static_batch,
            max_batch=trt_runner.max_batch,
            min_batch=trt_runner.min_batch,
        )
        rows, outputs, sizes = run_plan(trt_runner.infer, images, plan)
    with OrtRunner(Path(onnx_path)) as ort_runner:
        ref_plan = batch_plan(images.shape[0], 32, ort_runner.static_batch, check_batches=())
        ref_rows, ref_out, _ = run_plan(ort_runner.infer, images, ref_plan)
    reference = np.empty((images.shape[0], ref_out.shape[1]), dtype=np.float32)
    reference[ref_rows] = ref_out
    stats = compare(reference[rows], outputs)
    report = finish_report(
        stats,
        label=f"TensorRT {precision.upper()} engine",
        path=Path(engine_path),
        images=int(images.shape[0]),
        batch_sizes=sizes,
        tolerance=tol,
        relative=True,
        raise_on_fail=raise_on_fail,
        against="ONNX Runtime FP32",
        runtime="tensorrt",
        min_top1=top1,
    )
    report["precision"] = precision
    return report
