"""The runtime layer: one small base class, one class per runtime.

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

The backends, one module per runtime family: :mod:`.torch` (torch-cpu, torch-cuda),
:mod:`.ort` (ort-cpu, ort-cuda, ort-trt), :mod:`.tensorrt` (trt); :mod:`.base` holds the base
class and :mod:`.cuda` the CUDA-event timing they share. Parity checks (:mod:`gslim.export`),
profiling (:mod:`gslim.profiling`) and the latency model all run artifacts through this layer.
"""

from __future__ import annotations

from gslim.errors import GslimError
from gslim.runtime.base import (
    ARTIFACT_SUFFIX,
    Backend,
    BackendOptions,
    BackendUnavailable,
    BatchUnsupported,
    cuda_device_info,
    random_input,
)
from gslim.runtime.onnx_info import check_placement, node_placement, onnx_io_info
from gslim.runtime.ort import OrtCPU, OrtCUDA, OrtTensorRT
from gslim.runtime.tensorrt import TensorRT
from gslim.runtime.torch import TorchCPU, TorchCUDA

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


__all__ = [
    "ARTIFACT_SUFFIX",
    "BACKENDS",
    "Backend",
    "BackendOptions",
    "BackendUnavailable",
    "BatchUnsupported",
    "OrtCPU",
    "OrtCUDA",
    "OrtTensorRT",
    "TensorRT",
    "TorchCPU",
    "TorchCUDA",
    "availability",
    "check_placement",
    "cuda_device_info",
    "get_backend",
    "node_placement",
    "onnx_io_info",
    "random_input",
]
