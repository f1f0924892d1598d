"""The runtime layer's base class, options and errors (see :mod:`gslim.runtime`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from gslim.errors import GslimError, MissingDependencyError

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
    dla_core: Optional[int] = None  # trt: run the engine on this DLA core (Jetson)
    # infer() splits (and pads) a batch that the artifact cannot take in one go, for accuracy
    # scoring over a loader; False: such a batch is a BatchUnsupported error (parity checks)
    fit_batches: bool = True
    input_channels: int = 3  # image channels of the staged timing input (a single layer may have more)


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    from gslim.environment import cpu_count, cpu_model

    return {"cpu": cpu_model(), "cpu_count": cpu_count()}


def cuda_device_info(device_id: int = 0) -> dict[str, Any]:
    """GPU, driver, CUDA, TensorRT, clocks and power (and a Jetson's power mode): see
    :mod:`gslim.profiling.gpu_context`."""
    from gslim.profiling.gpu_context import gpu_context

    return gpu_context(device_id)


def as_numpy(batch: Any, dtype: Any = None):
    import numpy as np

    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    arr = np.ascontiguousarray(batch)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def host_threads() -> int:
    """The CPU threads a check that is not a timing may use (torch's intra-op setting)."""
    import torch

    return max(1, torch.get_num_threads())


def random_input(shape: tuple[int, ...], dtype: Any, seed: int = 0):
    """The fixed timing input: standard normal values (the normalised-image range)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype)


def torch_cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, "this PyTorch build has no CUDA support (install a CUDA build of torch)"
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, ""


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# ----------------------------------------------------------------------------- base class


class Backend:
    """activate → (infer | prepare → sample…) → deactivate; use ``with Backend(path) as b:``."""

    name: ClassVar[str] = ""
    artifact: ClassVar[str] = "pt"  # which file it runs: 'pt', 'onnx' or 'engine'
    device: ClassVar[str] = "cpu"
    runtime: ClassVar[str] = "torch"  # module whose version is recorded

    def __init__(self, path: "str | Path | Any", options: Optional[BackendOptions] = None):
        # the torch backends also run an in-memory nn.Module (the latency table's single layers)
        self.module = None if isinstance(path, (str, Path)) else path
        self.path = Path(path) if self.module is None else Path(f"<{type(path).__name__}>")
        self.options = options or BackendOptions()
        self.notes: list[str] = []
        self.batch: Optional[int] = None
        self.input_hw: Optional[tuple[int, int]] = None
        self.input_channels = self.options.input_channels
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
        if self.module is not None and self.artifact != "pt":
            raise GslimError(f"{self.name} runs {self.artifact} files, not an in-memory module")
        if self.module is None and not self.path.is_file():
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
        return {"kind": "cpu", **cpu_info(), "threads": self.options.threads}

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
            "timing": "host wall clock"
            if self.device == "cpu"
            else "device compute (CUDA events); e2e adds host<->device copies",
            "notes": list(self.notes),
        }

    def _stage_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        hw = self.input_hw
        if hw is None:
            if not self.options.input_size:
                raise GslimError(f"{self.name}: {self.path} does not fix its input size; pass the input size")
            hw = (self.options.input_size, self.options.input_size)
        return (batch_size, getattr(self, "input_channels", 3), hw[0], hw[1])
