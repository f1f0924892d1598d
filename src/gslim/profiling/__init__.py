"""Latency and accuracy profiling of base and compressed models across runtimes.

- :mod:`gslim.profiling.stage`: the profile stage (``gslim profile``, ``gslim run``);
- :mod:`gslim.profiling.artifacts`: files grouped into the models a profile compares;
- :mod:`gslim.profiling.measure`: time-based warm-up, interleaved rounds of timed runs, pure
  statistics (median, percentiles, CV, throughput, speedup) and top-1 scoring.
- :mod:`gslim.profiling.report`: ``report.json``, ``report.md`` and ``tradeoff.png``;
- :mod:`gslim.profiling.gpu_context`: clocks, power and driver recorded with GPU numbers.

The runtimes themselves (one class per runtime, imported lazily) are :mod:`gslim.runtime`, a
layer below: parity checks and the latency model use them too.

Importing this package is cheap: no torch, onnxruntime or TensorRT until a backend is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROLES = ("base", "compressed")


@dataclass
class ArtifactSet:
    """One model in its several forms (checkpoint, ONNX file, TensorRT engine).

    ``checkpoint`` is the gslim ``.pt`` (used by the PyTorch backends, and for MACs, params,
    input size and class count); it may be ``None`` for an ONNX/engine-only artifact.
    """

    label: str
    role: str
    checkpoint: Optional[Path]
    onnx: Optional[Path] = None
    engine: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def path_for(self, kind: str) -> Optional[Path]:
        """The file a backend of artifact ``kind`` ('pt', 'onnx' or 'engine') needs, or None."""
        p = {"pt": self.checkpoint, "onnx": self.onnx, "engine": self.engine}[kind]
        return Path(p) if p is not None else None

    def files(self) -> dict[str, Path]:
        return {
            k: Path(v)
            for k, v in (("pt", self.checkpoint), ("onnx", self.onnx), ("engine", self.engine))
            if v is not None
        }


__all__ = ["ArtifactSet", "ROLES"]
