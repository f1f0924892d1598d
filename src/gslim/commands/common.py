"""What the Typer commands share: recipe loading with ``--set`` overrides and common options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from gslim.recipe import Recipe, load_recipe, parse_set_options

RecipeArg = typer.Argument(None, help="Recipe YAML (see configs/). Omit to use the built-in defaults.")
SetOpt = typer.Option(
    None, "--set", help="Override a recipe value with a dotted key, e.g. --set train.epochs=5 (repeatable)."
)
ForceOpt = typer.Option(False, "--force", help="Overwrite finished results instead of refusing.")
NoProgressOpt = typer.Option(False, "--no-progress", help="Hide progress bars.")


def recipe_from_cli(path: Optional[Path], sets: Optional[list[str]], **overrides: Any) -> Recipe:
    """Load the recipe, then apply ``--set`` values and explicit options (options win)."""
    merged = parse_set_options(sets)
    merged.update({k.replace("__", "."): v for k, v in overrides.items() if v is not None})
    return load_recipe(path, merged)
