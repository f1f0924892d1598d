"""Timing on a CUDA stream, shared by the GPU backends."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

from gslim.runtime.base import cuda_device_info, random_input


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """PyTorch's two TF32 switches set for the block, restored after it."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class CudaTimed:
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
