"""Shared fixtures: tiny synthetic recipes and an in-process CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Small enough for a 2-core CPU: 32x32 synthetic images, 4 classes, a few batches per epoch.
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"arch": "mobilenet_v2", "num_classes": 4, "input_size": 32},
    "data": {
        "kind": "synthetic",
        "batch_size": 16,
        "workers": 0,
        "synthetic_train": 64,
        "synthetic_val": 32,
        "calib_images": 32,
    },
    "train": {"epochs": 1, "lr": 0.4, "warmup_epochs": 0.5, "device": "cpu"},
}


def tiny_recipe_dict(overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """TINY_RECIPE with dotted-key overrides applied (``{"train.epochs": 2}``; a None value deletes)."""
    import copy

    data = copy.deepcopy(TINY_RECIPE)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


@pytest.fixture
def make_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_recipe({"train.epochs": 2}, name="r.yaml")`` writes a tiny recipe YAML.

    The recipe's run_dir is ``tmp_path/"run"`` unless overridden.
    """

    def _make(overrides: Optional[dict[str, Any]] = None, name: str = "recipe.yaml") -> Path:
        merged = {"run_dir": str(tmp_path / "run"), **(overrides or {})}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_recipe_dict(merged), sort_keys=False))
        return path

    return _make


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture) -> Callable[[list[str]], CliResult]:
    """Run ``gslim ARGS`` in-process through ``gslim.cli.main``; returns exit code, stdout, stderr."""
    from gslim import cli

    def _run(args: list[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        saved = dict(cli._STATE)
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            cli._STATE.update(saved)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return _run


def slim_vs_masked(model, keeps: dict, input_size: int = 32):
    """Slim a copy of ``model`` to ``keeps`` (unit name -> kept channels) and compare it with the
    masked original on random inputs: (largest difference relative to max(1, |output|), slim)."""
    import copy

    import torch

    from gslim.compress.slim import masked_copy, slim_unit
    from gslim.compress.units import find_units

    units = find_units(model, input_size).units
    masked = masked_copy(model, [(u, keeps[u.name]) for u in units if u.name in keeps])
    slim = copy.deepcopy(model)
    for u in find_units(slim, input_size).units:
        if u.name in keeps:
            slim_unit(slim, u, keeps[u.name])
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        want, got = masked(x), slim(x)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max())), slim


def lstsq_error(X, Y, cols) -> float:
    """Relative squared error of the least-squares fit of ``Y`` on columns ``cols`` of ``X``:
    what the greedy path's error after selecting those columns must equal (no ridge)."""
    import torch

    W = torch.linalg.lstsq(X[:, cols], Y).solution
    return float(((Y - X[:, cols] @ W) ** 2).sum() / (Y**2).sum())
