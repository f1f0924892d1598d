"""TensorRT at run time: a serialized engine on torch CUDA buffers (``execute_async_v3``), and
the pieces that building and running share (gslim's one TensorRT logger, address binding,
dtype mapping, DLA support). The build side is :mod:`gslim.export.tensorrt`.

``tensorrt`` is imported lazily. Device buffers are torch CUDA tensors (``data_ptr()`` goes to
``set_tensor_address``), so neither pycuda nor cuda-python is needed.
"""

from __future__ import annotations

from typing import Any, Optional

from gslim.errors import GslimError, first_line
from gslim.runtime.base import Backend, BatchUnsupported, as_numpy, chunks, torch_cuda_available
from gslim.runtime.cuda import CudaTimed

_LOGGERS: dict[int, Any] = {}


def trt_logger(trt):
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


def check_dla_support(major: int, dla_core: Optional[int]) -> None:
    """DLA exists on TensorRT 10.x (JetPack 6); TensorRT 11 releases do not support it
    (TensorRT 11.3 developer guide, "Strongly Typed Networks for DLA": "DLA is not supported in
    TensorRT 11.3.0 ... DLA was also not supported in TensorRT 11.0, 11.1, or 11.2")."""
    if dla_core is not None and major >= 11:
        raise GslimError(f"--dla-core needs TensorRT 10.x (JetPack): TensorRT {major}.x does not support DLA")


def torch_dtype(trt, dtype):
    """The torch dtype of a TensorRT tensor type (``trt.DataType``)."""
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


class TensorRT(CudaTimed, Backend):
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
            return False, f"tensorrt cannot be imported: {first_line(exc)}"
        return torch_cuda_available()

    def _torch_dtype(self, trt_dtype: Any):
        return torch_dtype(self._trt, trt_dtype)

    def activate(self) -> None:
        import tensorrt as trt

        self._trt = trt
        self._init_cuda(self.options.device_id)
        self._logger = trt_logger(trt)  # gslim's one logger: TensorRT keeps the first a process makes
        since = self._logger.mark()
        check_dla_support(int(str(trt.__version__).split(".")[0]), self.options.dla_core)
        self._runtime = trt.Runtime(self._logger)
        if self.options.dla_core is not None:
            self._runtime.DLA_core = int(self.options.dla_core)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise GslimError(
                f"trt: cannot deserialize {self.path}: it was built by another TensorRT version "
                f"(this is {trt.__version__}) or for another GPU; rebuild it with gslim export "
                f"({self._logger.first_error('no TensorRT error text', since)})"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self._inputs) != 1 or not self._outputs:
            raise GslimError(
                f"{self.path}: expected one input and at least one output, got "
                f"{len(self._inputs)} input(s) and {len(self._outputs)} output(s)"
            )
        self.input_name = self._inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if len(shape) != 4:
            raise GslimError(f"{self.path}: expected an NCHW image input, got shape {shape}")
        self._in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.fixed_batch: Optional[int] = None
        if shape[0] == -1:
            lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        else:
            self.fixed_batch = self.min_batch = self.opt_batch = self.max_batch = int(shape[0])
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
            raise BatchUnsupported(
                f"batch {b} is outside the engine's profile "
                f"[{self.min_batch}, {self.max_batch}] (rebuild with a larger max_batch)"
            )
        if not self.context.set_input_shape(self.input_name, tuple(d_in.shape)):
            raise BatchUnsupported(f"the engine rejects the input shape {tuple(d_in.shape)}")
        bind_address(self.context, self.input_name, d_in.data_ptr())
        outs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = self._torch.empty(
                shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)), device=self._dev
            )
            bind_address(self.context, name, outs[name].data_ptr())
        return outs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise GslimError(f"trt: execute_async_v3 failed for {self.path}")

    def infer(self, batch: Any):
        import numpy as np

        torch = self._torch
        self._graph = None  # rebinding invalidates a captured graph; prepare() recaptures
        x = torch.as_tensor(as_numpy(batch, "float32"))
        if not self.options.fit_batches and not self.min_batch <= x.shape[0] <= self.max_batch:
            raise BatchUnsupported(
                f"batch {x.shape[0]} is outside the engine's profile [{self.min_batch}, {self.max_batch}]"
            )
        results = []
        for a, b in chunks(x.shape[0], self.max_batch):
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
            raise BatchUnsupported(
                f"batch {batch_size} is outside the engine's profile [{self.min_batch}, {self.max_batch}]"
            )
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
                self.notes.append(
                    f"CUDA graph capture failed ({first_line(exc)}); measured with plain enqueues"
                )
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
        d["options"] = {
            "cuda_graph": self._graph is not None if self.active else self.use_graphs,
            "profile_batch": [getattr(self, "min_batch", None), getattr(self, "max_batch", None)],
        }
        return d
