"""``gslim run RECIPE``: the whole pipeline (:mod:`gslim.pipeline`) from the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from gslim.commands.common import ForceOpt, NoProgressOpt, SetOpt, recipe_from_cli


def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML describing the whole run (see configs/demo.yaml)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME)."),
    sets: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Run the whole pipeline: train (if asked) → compress → finetune → export → profile → report."""
    from gslim.pipeline import run_pipeline

    r = recipe_from_cli(recipe, sets, run_dir=str(run_dir) if run_dir else None)
    t0 = time.perf_counter()
    out = run_pipeline(r, force=force, progress=not no_progress)
    report = Path(out["report"])
    if report.is_file():
        typer.echo(report.read_text())
    typer.echo(
        f"\nrun finished in {time.perf_counter() - t0:.0f} s; report: {report} "
        f"(plot: {report.parent / 'tradeoff.png'})"
    )


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
