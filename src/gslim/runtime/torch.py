"""Eager PyTorch on the CPU and on CUDA."""

from __future__ import annotations

from typing import Any

from gslim.errors import first_line
from gslim.runtime.base import Backend, as_numpy, random_input, torch_cuda_available
from gslim.runtime.cuda import CudaTimed


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
        if self.module is not None:
            self.model, self.spec = self.module.eval(), None
            self.input_hw = (self.options.input_size, self.options.input_size)
        else:
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
        x = self._torch.as_tensor(as_numpy(batch, "float32"))
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


class TorchCUDA(CudaTimed, Backend):
    """Eager PyTorch on CUDA: optional FP16, channels_last and CUDA graphs."""

    name = "torch-cuda"
    artifact = "pt"
    device = "cuda"
    runtime = "torch"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return torch_cuda_available()

    def activate(self) -> None:
        from gslim.models import load_model

        self._init_cuda(self.options.device_id)
        torch = self._torch
        if self.module is not None:
            import copy

            model, self.spec = copy.deepcopy(self.module), None
            self.input_hw = (self.options.input_size, self.options.input_size)
        else:
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
        x = torch.as_tensor(as_numpy(batch, "float32"))
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
                self.notes.append(f"CUDA graph capture failed ({first_line(exc)}); measured eagerly")
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
