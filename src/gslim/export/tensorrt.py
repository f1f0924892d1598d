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

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gslim.artifacts import Transaction, atomic_write
from gslim.errors import GslimError, MissingDependencyError
from gslim.runtime.tensorrt import check_dla_support, trt_logger

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
    logger = trt_logger(trt)
    since = logger.mark()
    with Transaction() as tx:
        scratch = tx.scratch(engine_path)
        builder = trt.Builder(logger)
        config = builder.create_builder_config()
        network, source, mode, strongly_typed = _network_for(
            trt, builder, major, precision, onnx_path, fp16_onnx, int8_onnx, scratch
        )
        info["onnx"] = str(source) if scratch not in source.parents else f"{source.name} (temporary)"
        _parse(trt, network, logger, since, source)
        info.update(_add_batch_profile(builder, config, network, min_batch, opt_batch, max_batch))
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
        info.update(_build_and_write(builder, network, config, logger, since, engine_path, timing_cache))
    info["warnings"] = logger.warnings[:5]
    return info


def _network_for(
    trt,
    builder,
    major: int,
    precision: str,
    onnx_path: Path,
    fp16_onnx: Optional[Path],
    int8_onnx: Optional[Path],
    scratch: Path,
) -> tuple[Any, Path, Optional[str], bool]:
    """The empty network to parse into, the ONNX to parse, the precision mode (None: decided after
    parsing, on a weakly typed network) and whether the network is strongly typed."""
    if precision == "int8":
        network, strongly_typed = _qdq_network(trt, builder, major)
        return network, _qdq_source(onnx_path, int8_onnx), "strongly-typed Q/DQ ONNX", strongly_typed
    if major >= 11:
        # Strongly typed always (the STRONGLY_TYPED creation flag is deprecated and ignored).
        source, mode = _typed_source_v11(precision, onnx_path, fp16_onnx, scratch)
        return builder.create_network(0), source, mode, False
    return builder.create_network(0), onnx_path, None, False


def _parse(trt, network, logger, since: int, source: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else logger.first_error("unknown parser error", since)
        raise GslimError(f"TensorRT cannot parse {source.name}: {first}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise GslimError(f"{source.name} must have one input and one output for gslim's engine builder")


def _add_batch_profile(builder, config, network, min_batch: int, opt_batch: int, max_batch: int) -> dict:
    """An optimization profile for a dynamic batch axis; a static batch needs none."""
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    out: dict[str, Any] = {"input": {"name": inp.name, "shape": list(shape)}}
    if shape[0] == -1:
        profile = builder.create_optimization_profile()
        dims = shape[1:]
        profile.set_shape(inp.name, (min_batch, *dims), (opt_batch, *dims), (max_batch, *dims))
        config.add_optimization_profile(profile)
        out["profile"] = {"min": min_batch, "opt": opt_batch, "max": max_batch}
    else:
        out["profile"] = {"static_batch": shape[0]}
    return out


def _build_and_write(
    builder, network, config, logger, since: int, engine_path: Path, timing_cache: Optional[Path]
) -> dict:
    """Build, write the engine atomically, and write back the updated timing cache."""
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = round(time.perf_counter() - start, 2)
    if serialized is None:
        raise GslimError(
            f"TensorRT could not build the engine: {logger.first_error('see the TensorRT log', since)}"
        )
    data = bytes(memoryview(serialized))
    atomic_write(engine_path, lambda tmp: tmp.write_bytes(data))
    if timing_cache is not None:
        cache = config.get_timing_cache()
        if cache is not None:
            blob = bytes(memoryview(cache.serialize()))
            atomic_write(Path(timing_cache), lambda tmp: tmp.write_bytes(blob))
    return {"build_s": build_s, "bytes": len(data)}


def _typed_source_v11(
    precision: str, onnx_path: Path, fp16_onnx: Optional[Path], scratch: Path
) -> tuple[Path, str]:
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


# --------------------------------------------------------------------------- run


def TrtRunner(engine_path: Path, *, dla_core: Optional[int] = None):  # noqa: N802 - reads like the class it gives
    """The runtime layer's TensorRT backend as a parity runner: every batch must fit the engine's
    profile (no splitting), ``with TrtRunner(p) as r: r.infer(x)``."""
    from gslim.runtime import BackendOptions, TensorRT

    return TensorRT(Path(engine_path), BackendOptions(dla_core=dla_core, fit_batches=False))


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
    from gslim.export.parity import batch_plan, compare, finish_report, ort_cpu, run_plan

    if precision not in PRECISIONS:
        raise GslimError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tol = ENGINE_TOLERANCES[precision] if tolerance is None else tolerance
    top1 = ENGINE_MIN_TOP1[precision] if min_top1 is None else min_top1
    images = images.detach().cpu().float().contiguous()
    require_engine_support()
    with TrtRunner(engine_path, dla_core=dla_core) as trt_runner:
        plan = batch_plan(
            images.shape[0],
            batch_size or trt_runner.opt_batch,
            trt_runner.fixed_batch,
            max_batch=trt_runner.max_batch,
            min_batch=trt_runner.min_batch,
        )
        rows, outputs, sizes = run_plan(trt_runner.infer, images, plan)
    with ort_cpu(onnx_path) as ort_runner:
        ref_plan = batch_plan(images.shape[0], 32, ort_runner.fixed_batch, check_batches=())
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
