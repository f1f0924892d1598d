"""Helpers shared by the stage commands: recipe loading with overrides, devices, run metadata."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from gslim.errors import GslimError, MissingDependencyError
from gslim.recipe import Recipe, load_recipe, parse_set_options

RecipeArg = typer.Argument(None, help="Recipe YAML (see configs/). Omit to use the built-in defaults.")
SetOpt = typer.Option(
    None, "--set", help="Override a recipe value with a dotted key, e.g. --set train.epochs=5 (repeatable)."
)
ForceOpt = typer.Option(False, "--force", help="Overwrite finished results instead of refusing.")


def recipe_from_cli(path: Optional[Path], sets: Optional[list[str]], **overrides: Any) -> Recipe:
    """Load the recipe, then apply ``--set`` values and explicit options (options win)."""
    merged = parse_set_options(sets)
    merged.update({k.replace("__", "."): v for k, v in overrides.items() if v is not None})
    return load_recipe(path, merged)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError("CUDA was requested but no CUDA device is available (use --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def environment_info(device: Optional[str] = None) -> dict[str, Any]:
    """Versions and hardware, recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": _cpu_count(),
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_count() -> int:
    import os

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
