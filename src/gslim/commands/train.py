"""``gslim train`` (train the base model of a recipe) and ``gslim evaluate`` (score any checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gslim.commands.common import ForceOpt, RecipeArg, SetOpt, recipe_from_cli
from gslim.environment import is_main_process
from gslim.errors import GslimError


def train_command(
    recipe: Optional[Path] = RecipeArg,
    sets: Optional[list[str]] = SetOpt,
    run_dir: Optional[Path] = typer.Option(
        None,
        "--run-dir",
        help="Directory for base.pt, last.pt and the logs (default: the recipe's run_dir, else runs/<name>).",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs (train.epochs)."),
    lr: Optional[float] = typer.Option(
        None, "--lr", help="Peak learning rate for a global batch of 256, scaled linearly (train.lr)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Batch size per process (data.batch_size)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (train.device)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from <run-dir>/last.pt."
    ),
    force: bool = ForceOpt,
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not show a progress bar."),
) -> None:
    """Train the recipe's model (the base model that the pipeline later compresses) and write base.pt.

    Launch with torchrun (e.g. torchrun --standalone --nproc_per_node 4 -m gslim train RECIPE) for
    multi-GPU or multi-node data-parallel training.
    """
    from gslim.train.stage import train_stage

    rec = recipe_from_cli(
        recipe,
        sets,
        run_dir=str(run_dir) if run_dir is not None else None,
        train__epochs=epochs,
        train__lr=lr,
        data__batch_size=batch_size,
        train__device=device,
    )
    result = train_stage(rec, rec.resolved_run_dir(), resume=resume, force=force, progress=not no_progress)
    if is_main_process():
        mt = result.metrics
        typer.echo(
            f"trained {rec.model.arch} for {result.epochs} epoch(s): val top-1 {mt.get('val_top1', float('nan')):.2f}%"
            f"  top-5 {mt.get('val_top5', float('nan')):.2f}%  -> {result.final_path}"
        )


def evaluate_command(
    checkpoint: Path = typer.Argument(
        ...,
        help="A gslim checkpoint (base.pt, slim.pt, finetuned.pt, ...) "
        "or a bare state dict (then the recipe names model.arch).",
    ),
    recipe: Optional[Path] = typer.Argument(
        None,
        help="Recipe YAML for the validation data. Default: recipe.resolved.yaml next to the "
        "checkpoint, else the built-in defaults with the checkpoint's architecture.",
    ),
    sets: Optional[list[str]] = SetOpt,
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="Score only the first N validation images."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default: auto)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not show a progress bar."),
) -> None:
    """Print top-1/top-5 accuracy and the mean loss of a checkpoint on the recipe's validation data."""
    from gslim.artifacts import save_json
    from gslim.environment import resolve_device
    from gslim.models import load_model
    from gslim.train import evaluate_on_recipe
    from gslim.train.stage import resolved_recipe_of

    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise GslimError(f"--device must be auto, cpu or cuda, got {device!r}")
    if json_out is not None:  # fail before the evaluation, not after it
        from gslim.artifacts import check_output_dir

        check_output_dir(json_out.parent, "--json directory")
    recipe_path = recipe if recipe is not None else resolved_recipe_of(checkpoint)
    rec = recipe_from_cli(recipe_path, sets)
    set_keys = {s.split("=", 1)[0].strip() for s in sets or []}
    model_named = recipe_path is not None or any(k.startswith("model.") for k in set_keys)
    if model_named:  # the recipe says which model it expects: a checkpoint of another one is an error
        model, spec = load_model(
            checkpoint,
            expect_arch=rec.model.arch,
            num_classes=rec.model.num_classes,
            input_size=rec.model.input_size,
        )
    else:
        model, spec = load_model(checkpoint)
    # Score at the resolution the model was trained for unless --set model.input_size says otherwise.
    size = (
        rec.model.input_size if "model.input_size" in set_keys else (spec.input_size or rec.model.input_size)
    )
    rec = recipe_from_cli(
        recipe_path, sets, model__arch=spec.arch, model__num_classes=spec.num_classes, model__input_size=size
    )
    dev = resolve_device(device or "auto")
    metrics = evaluate_on_recipe(model, rec, dev, limit=limit, progress=not no_progress)
    typer.echo(
        f"{checkpoint}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}"
        f"  ({metrics['images']} images, {spec.arch}, {dev})"
    )
    if json_out is not None:
        save_json(
            {
                "checkpoint": str(checkpoint),
                "arch": spec.arch,
                "widths": spec.widths,
                "input_size": rec.model.input_size,
                "data": rec.data.kind,
                "device": str(dev),
                **metrics,
            },
            json_out,
        )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
