"""ONNX Runtime: the CPU, CUDA and TensorRT execution providers, and where nodes ran."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Optional

from gslim.errors import GslimError, first_line
from gslim.runtime.base import (
    Backend,
    BackendUnavailable,
    BatchUnsupported,
    as_numpy,
    chunks,
    random_input,
    torch_cuda_available,
)
from gslim.runtime.cuda import CudaTimed
from gslim.runtime.onnx_info import ORT_NP, check_placement, node_placement, onnx_io_info


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


class OrtBackend(Backend):
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
            return False, (
                f"{cls.provider} is not in this onnxruntime build "
                f"(it has {', '.join(providers)}); install onnxruntime-gpu"
            )
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
            self.session = ort.InferenceSession(
                str(self.path), self._session_options(), providers=self._providers()
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Exception subclasses
            raise GslimError(f"{self.name}: onnxruntime cannot load {self.path}: {first_line(exc)}") from exc
        active = self.session.get_providers()
        if not active or active[0] != self.provider:
            raise BackendUnavailable(
                f"{self.name}: {self.provider} did not initialise (onnxruntime fell back to "
                f"{active[0] if active else 'nothing'}); check the CUDA/TensorRT libraries"
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.in_dtype = ORT_NP.get(inp.type)
        if self.in_dtype is None:
            raise GslimError(f"{self.path}: input type {inp.type} is not a floating-point image tensor")
        shape = list(inp.shape)
        if len(shape) != 4:
            raise GslimError(f"{self.path}: expected an NCHW image input, got shape {shape}")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if isinstance(shape[1], int) and shape[1] > 0:
            self.input_channels = shape[1]
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
            raise BatchUnsupported(
                f"{self.path.name} has a fixed batch of {self.fixed_batch} (export with a dynamic batch axis)"
            )

    def _run_host(self, x):
        """Run on a host array in chunks that fit a fixed batch (padding the last one)."""
        import numpy as np

        x = as_numpy(x, self.in_dtype)
        n = x.shape[0]
        if self.fixed_batch is None:
            return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)
        if not self.options.fit_batches:
            self._check_batch(n)
        outs = []
        for a, b in chunks(n, self.fixed_batch):
            part = x[a:b]
            if part.shape[0] < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - part.shape[0], *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            out = self.session.run([self.output_name], {self.input_name: part})[0]
            outs.append(np.asarray(out[: b - a], dtype=np.float32))
        return np.concatenate(outs)

    def infer(self, batch: Any):
        try:
            return self._run_host(batch)
        except GslimError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Exception subclasses
            raise GslimError(
                f"{self.name}: ONNX Runtime failed on {self.path.name} (batch "
                f"{len(batch)}): {first_line(exc)}"
            ) from exc

    def runtime_info(self) -> dict[str, Any]:
        d = super().runtime_info()
        session = getattr(self, "session", None)
        d["providers"] = session.get_providers() if session is not None else [self.provider]
        return d


class OrtCPU(OrtBackend):
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
        d["options"] = {
            "intra_op_num_threads": self.options.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
        }
        return d


class OrtCUDA(CudaTimed, OrtBackend):
    """ONNX Runtime CUDA EP with IO binding to torch CUDA buffers, on a stream we time with events."""

    name = "ort-cuda"
    device = "cuda"
    provider = "CUDAExecutionProvider"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, reason = cls._ort_available()
        if not ok:
            return ok, reason
        return torch_cuda_available()

    def _cuda_provider(self) -> tuple[str, dict[str, Any]]:
        return (
            "CUDAExecutionProvider",
            {
                "device_id": self.options.device_id,
                "user_compute_stream": str(self._stream.cuda_stream),
                "cudnn_conv_algo_search": "EXHAUSTIVE",
            },
        )

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
        OrtBackend.deactivate(self)
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
        binding.bind_input(
            self.input_name, "cuda", dev_id, np.dtype(self.in_dtype), list(shape), self._d_in.data_ptr()
        )
        binding.bind_output(self.output_name, "cuda", dev_id)  # ORT allocates once to reveal the shape
        self.session.run_with_iobinding(binding)
        ort_out = binding.get_outputs()[0]
        out_shape, out_dtype = ort_out.shape(), ORT_NP.get(ort_out.data_type(), "float32")
        tout = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}[out_dtype]
        self._d_out = torch.empty(out_shape, dtype=tout, device=self._dev)
        binding.clear_binding_outputs()
        binding.bind_output(
            self.output_name, "cuda", dev_id, np.dtype(out_dtype), list(out_shape), self._d_out.data_ptr()
        )
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
            self.notes.append(
                f"{self.placement['cpu_shape_nodes']} shape-only node(s) on the CPU "
                "(ONNX Runtime keeps shape arithmetic there)"
            )

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
                "FP32 (strongly typed); profile an FP16 ONNX (gslim export --fp16-onnx) instead of --fp16"
            )
        cc = self._torch.cuda.get_device_capability(self._dev)
        if not has_fast_fp16(cc):
            raise BackendUnavailable(
                f"{self.name}: this GPU (sm_{cc[0]}{cc[1]}) has no fast FP16, so TensorRT builds FP32 despite "
                "trt_fp16_enable; profile without --fp16"
            )
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
            raise BatchUnsupported(
                f"batch {batch_size} is above the TensorRT profile's maximum {self.options.max_batch}"
            )

    def _run_host(self, x):
        import numpy as np

        x = as_numpy(x)
        if self.fixed_batch is None and x.shape[0] > self.options.max_batch:
            return np.concatenate(
                [
                    super(OrtTensorRT, self)._run_host(x[a:b])
                    for a, b in chunks(x.shape[0], self.options.max_batch)
                ]
            )
        return super()._run_host(x)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["options"] = {
            "io_binding": True,
            "trt_fp16_enable": bool(self.options.fp16),
            "engine_cache": str(self.options.cache_dir) if self.options.cache_dir else "cwd",
            "timing_cache": True,
        }
        return d
