"""`gslim compress` and `gslim finetune`: the compression stages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from gslim.commands.common import (
    ForceOpt,
    RecipeArg,
    SetOpt,
    ensure_run_dir,
    environment_info,
    recipe_from_cli,
)
from gslim.errors import GslimError
from gslim.recipe import Recipe


def resolve_base_model(recipe: Recipe, run_dir: Path, model_path: Optional[Path]):
    """The uncompressed model: an explicit file, the recipe's weights, or the run's trained base."""
    from gslim.models import ModelSpec, build_model, load_model

    m = recipe.model
    if model_path is not None:
        model, spec = load_model(model_path, expect_arch=m.arch, num_classes=m.num_classes, input_size=m.input_size)
        return model, spec, str(model_path)
    if m.weights is not None:
        model = build_model(m.arch, m.num_classes, m.weights).eval()
        return model, ModelSpec(m.arch, m.num_classes, m.input_size), m.weights
    trained = run_dir / "base.pt"
    if trained.is_file():
        model, spec = load_model(trained, expect_arch=m.arch, num_classes=m.num_classes)
        return model, spec, str(trained)
    raise GslimError(
        f"no base model: pass --model, set model.weights in the recipe, or train one first "
        f"(gslim train RECIPE writes {trained})"
    )


def compress_stage(recipe: Recipe, run_dir: Path, *, model_path: Optional[Path] = None,
                   out_name: str = "slim.pt", selection_name: str = "selection.json",
                   force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Select and slim; write the slim checkpoint and selection.json. Returns the selection summary."""
    import torch

    from gslim.artifacts import atomic_path, check_output_dir, refuse_overwrite, save_json
    from gslim.compress.select import compress_model
    from gslim.data import calibration_batch
    from gslim.models import ModelSpec, count_macs_params, save_checkpoint

    check_output_dir(run_dir, "run directory")  # before minutes of selection, not after
    ensure_run_dir(run_dir)
    out, sel_path = run_dir / out_name, run_dir / selection_name
    refuse_overwrite(out, force, "compressed model")
    torch.manual_seed(recipe.seed)
    model, spec, source = resolve_base_model(recipe, run_dir, model_path)
    size = spec.input_size or recipe.model.input_size
    x, y = calibration_batch(recipe.data, size, recipe.model.num_classes, recipe.seed)
    macs0, params0 = count_macs_params(model, size)

    torch.set_flush_denormal(True)  # denormals from near-dead channels slow CPU convs several-fold
    try:
        with _UnitProgress(progress, "selecting channels") as report:
            result = compress_model(model, size, x, y, recipe.compress, seed=recipe.seed,
                                    batch_size=min(recipe.data.batch_size, 128), progress=report)
    finally:
        torch.set_flush_denormal(False)  # the process default; callers may compute on after us
    macs1, params1 = count_macs_params(result.model, size)
    slim_spec = ModelSpec(spec.arch, spec.num_classes, size, widths=result.widths,
                          meta={"base": source, "criterion": result.criterion, "stage": "compress"})
    summary = {
        "base_model": source,
        "arch": spec.arch,
        "input_size": size,
        "macs_before": macs0, "macs_after": macs1, "macs_fraction": macs1 / macs0,
        "params_before": params0, "params_after": params1, "params_fraction": params1 / params0,
        "bn_recalib": recipe.compress.bn_recalib,
        "config": recipe.compress.model_dump(mode="json"),
        **result.to_json(),
        "environment": environment_info(),
    }
    # The model is written to its temporary file first and renamed last: a slim.pt on disk
    # always has its own selection.json next to it, whichever write fails.
    with atomic_path(out) as tmp:
        save_checkpoint(result.model, slim_spec, tmp)
        save_json(summary, sel_path)
    summary["paths"] = {"model": str(out), "selection": str(sel_path)}
    return summary


def finetune_stage(recipe: Recipe, run_dir: Path, *, model_path: Optional[Path] = None,
                   teacher_path: Optional[Path] = None, out_name: str = "finetuned.pt",
                   resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune a compressed model with distillation from the base model (on by default)."""
    from gslim.models import load_model
    from gslim.train import fit

    model_path = model_path or run_dir / "slim.pt"
    if not Path(model_path).is_file():
        raise GslimError(f"no compressed model at {model_path}: run gslim compress first or pass --model")
    model, spec = load_model(model_path)
    cfg = recipe.finetune
    teacher = None
    if cfg.distill is not None:
        tpath = teacher_path or (Path(cfg.distill.teacher) if cfg.distill.teacher else None)
        if tpath is None:
            base = spec.meta.get("base")
            tpath = Path(base) if base and Path(base).is_file() else run_dir / "base.pt"
        if not Path(tpath).is_file():
            raise GslimError(f"distillation teacher {tpath} not found: pass --teacher or use --no-distill")
        teacher, _ = load_model(tpath, num_classes=spec.num_classes)
    spec.meta = {**spec.meta, "stage": "finetune", "teacher": str(tpath) if teacher is not None else None}
    result = fit(model, spec, cfg, recipe.data, run_dir, seed=recipe.seed, teacher=teacher, resume=resume,
                 force=force, output_name=out_name, log_name="finetune_log.jsonl",
                 last_name="finetune_last.pt", progress=progress, description="finetune")
    return {"model": str(result.final_path), "epochs": result.epochs, "metrics": result.metrics}


class _UnitProgress:
    """A rich progress bar over units (silent when not a terminal or disabled)."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label = enabled, label
        self._p = None
        self._task = None

    def __enter__(self):
        import sys

        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("{task.fields[unit]}"), transient=True)
            self._p.start()
            self._task = self._p.add_task(self.label, total=None, unit="")
        return self

    def __call__(self, unit: str, done: int, total: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done, total=total, unit=unit)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


def print_selection_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['arch']} — {summary['criterion']} selection", show_lines=False)
    for col in ("unit", "kind", "width", "kept", "rel. error (held out)"):
        t.add_column(col, justify="right" if col != "unit" else "left")
    for u in summary["units"]:
        err = "" if u["rel_error"] is None else f"{u['rel_error']:.4f}"
        t.add_row(u["name"], u["kind"], str(u["width"]), str(u["kept"]), err)
    con = Console(stderr=False)
    con.print(t)
    warnings = [w for u in summary["units"] for w in u.get("warnings") or []]
    for w in warnings[:5]:
        con.print(f"warning: {w}", markup=False)
    if len(warnings) > 5:
        con.print(f"warning: {len(warnings) - 5} more in the selection file", markup=False)
    con.print(
        f"MACs {summary['macs_before']:,} -> {summary['macs_after']:,} ({100 * summary['macs_fraction']:.1f}%), "
        f"params {summary['params_before']:,} -> {summary['params_after']:,} "
        f"({100 * summary['params_fraction']:.1f}%), selection took {summary['seconds']:.1f} s"
    )
    if summary.get("eps") is not None:
        con.print(f"eps = {summary['eps']:.3g}")
    con.print(f"wrote {summary['paths']['model']} and {summary['paths']['selection']}")


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(
        recipe: Optional[Path] = RecipeArg,
        model: Optional[Path] = typer.Option(None, "--model", help="Base checkpoint (default: the recipe's "
                                             "model.weights, else RUN_DIR/base.pt)."),
        criterion: Optional[str] = typer.Option(None, "--criterion", help="greedy (default), greedy-loss, l1, bn, "
                                                "random or uniform."),
        eps: Optional[float] = typer.Option(None, "--eps", help="Per-unit relative error tolerance (greedy)."),
        target_macs: Optional[str] = typer.Option(None, "--target-macs", help="MACs budget: '50%' of the base "
                                                  "model or an absolute count."),
        target_params: Optional[str] = typer.Option(None, "--target-params", help="Parameter budget, like "
                                                    "--target-macs."),
        round_to: Optional[int] = typer.Option(None, "--round-to", help="Round kept channels up to a multiple "
                                               "of this (8 default; 32 for INT8)."),
        min_width: Optional[int] = typer.Option(None, "--min-width", help="Never keep fewer channels than this."),
        bn_recalib: Optional[bool] = typer.Option(None, "--bn-recalib/--no-bn-recalib", help="Re-estimate "
                                                  "BatchNorm statistics on the calibration images afterwards."),
        prune_residual: Optional[bool] = typer.Option(None, "--prune-residual/--no-prune-residual",
                                                      help="Also select residual-coupled stage widths."),
        calib_images: Optional[int] = typer.Option(None, "--calib-images", help="Calibration images from train."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Output directory (default runs/NAME)."),
        output: str = typer.Option("slim.pt", "--output", help="File name of the slim checkpoint in RUN_DIR."),
        sets: Optional[list[str]] = SetOpt,
        force: bool = ForceOpt,
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Greedy channel selection and physical slimming of a trained model."""
        budget = {}
        if eps is not None or target_macs is not None or target_params is not None:
            # an explicit budget option replaces whichever budget the recipe names
            budget = {"compress.eps": None, "compress.target_macs": None, "compress.target_params": None}
        r = recipe_from_cli(recipe, sets, compress__criterion=criterion, compress__round_to=round_to,
                            compress__min_width=min_width, compress__bn_recalib=bn_recalib,
                            compress__prune_residual=prune_residual, data__calib_images=calib_images,
                            run_dir=str(run_dir) if run_dir else None)
        if budget:
            from gslim.recipe import parse_recipe, recipe_to_dict

            data = recipe_to_dict(r)
            data["compress"].update({"eps": eps, "target_macs": target_macs, "target_params": target_params})
            r = parse_recipe(data, str(recipe or "options"))
        summary = compress_stage(r, r.resolved_run_dir(), model_path=model, out_name=output, force=force,
                                 progress=not no_progress)
        print_selection_table(summary)

    @app.command("finetune")
    def finetune_cmd(
        recipe: Optional[Path] = RecipeArg,
        model: Optional[Path] = typer.Option(None, "--model", help="Compressed checkpoint (default RUN_DIR/slim.pt)."),
        teacher: Optional[Path] = typer.Option(None, "--teacher", help="Distillation teacher (default: the "
                                               "base model the slim model was compressed from)."),
        distill: bool = typer.Option(True, "--distill/--no-distill", help="Distil from the teacher."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate at batch 256."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Output directory (default runs/NAME)."),
        output: str = typer.Option("finetuned.pt", "--output", help="File name of the result in RUN_DIR."),
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/finetune_last.pt."),
        sets: Optional[list[str]] = SetOpt,
        force: bool = ForceOpt,
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Recover accuracy of a compressed model, distilling from the original (torchrun works)."""
        r = recipe_from_cli(recipe, sets, finetune__epochs=epochs, finetune__lr=lr,
                            run_dir=str(run_dir) if run_dir else None)
        if not distill:
            r.finetune.distill = None
        t0 = time.perf_counter()
        out = finetune_stage(r, r.resolved_run_dir(), model_path=model, teacher_path=teacher, out_name=output,
                             resume=resume, force=force, progress=not no_progress)
        m = out["metrics"]
        typer.echo(f"fine-tuned {out['epochs']} epoch(s) in {time.perf_counter() - t0:.0f} s: "
                   f"top-1 {m.get('val_top1', float('nan')):.2f}% -> {out['model']}")
