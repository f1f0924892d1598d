"""Where gslim runs: the torch device to use, the versions and hardware recorded with every
result, the run directory, and which process of a torchrun launch this is."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

from gslim.errors import GslimError, MissingDependencyError


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError("CUDA was requested but no CUDA device is available (use --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process that was not launched by torchrun."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def environment_info(device: Optional[str] = None) -> dict[str, Any]:
    """Versions and hardware, recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("torchvision", "onnx", "onnxruntime", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absence is the information
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    if device:
        info["device"] = device
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ensure_run_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GslimError(f"cannot create run directory {path}: {exc.strerror or exc}") from exc
    return path
