"""`gslim compress` and `gslim finetune`: the compression stages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from gslim.commands.common import ForceOpt, RecipeArg, SetOpt, recipe_from_cli
from gslim.compress.stage import compress_stage, finetune_stage


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
    recal = summary.get("bn_recalib") or {}
    if recal.get("checked") and not recal.get("applied"):
        con.print(
            f"BatchNorm re-calibration undone: the slim model's top-1 agreed with the original's on "
            f"{100 * recal['top1_agreement_without']:.1f}% of {recal['images']} calibration images without it, "
            f"{100 * recal['top1_agreement_with']:.1f}% with it (more calibration images make the re-fit reliable)",
            markup=False,
        )
    lat = summary.get("latency")
    if lat:
        err = 100 * lat["prediction_error"]
        con.print(
            f"latency on {lat['backend']} (batch {lat['batch']}): budget {lat['budget_ms']:.3f} ms "
            f"({lat['budget']}), predicted {lat['predicted_ms']:.3f} ms, measured {lat['measured_ms']:.3f} ms "
            f"(prediction error {err:+.1f}%), base {lat['base_ms']:.3f} ms -> {lat['speedup']:.2f}x "
            f"in {len(lat['rounds'])} round(s); table {lat['table']['path']} "
            f"({lat['table']['measured_now']} new entries)",
            markup=False,
        )
    con.print(f"wrote {summary['paths']['model']} and {summary['paths']['selection']}")


def compress_cmd(
    recipe: Optional[Path] = RecipeArg,
    model: Optional[Path] = typer.Option(
        None, "--model", help="Base checkpoint (default: the recipe's model.weights, else RUN_DIR/base.pt)."
    ),
    criterion: Optional[str] = typer.Option(
        None, "--criterion", help="greedy (default), greedy-loss, l1, bn, random or uniform."
    ),
    eps: Optional[float] = typer.Option(None, "--eps", help="Per-unit relative error tolerance (greedy)."),
    target_macs: Optional[str] = typer.Option(
        None, "--target-macs", help="MACs budget: '50%' of the base model or an absolute count."
    ),
    target_params: Optional[str] = typer.Option(
        None, "--target-params", help="Parameter budget, like --target-macs."
    ),
    target_latency: Optional[str] = typer.Option(
        None,
        "--target-latency",
        help="Latency budget measured on the target runtime: milliseconds ('2.5ms') "
        "or a fraction of the base model's measured latency ('50%'). Widths come from a latency table "
        "timed on --latency-backend (cached per device and runtime), then the slim model is measured and "
        "re-selected until it fits.",
    ),
    latency_backend: Optional[str] = typer.Option(
        None,
        "--latency-backend",
        help="Runtime of the latency budget: ort-cpu, ort-cuda, ort-trt, torch-cpu, "
        "torch-cuda (default: the first ONNX backend of profile.backends, else ort-cpu).",
    ),
    latency_table: Optional[Path] = typer.Option(
        None,
        "--latency-table",
        help="Latency table JSON to reuse and extend (default: the per-device cache "
        "in ~/.cache/gslim/latency).",
    ),
    round_to: Optional[int] = typer.Option(
        None, "--round-to", help="Round kept channels up to a multiple of this (8 default; 32 for INT8)."
    ),
    min_width: Optional[int] = typer.Option(None, "--min-width", help="Never keep fewer channels than this."),
    bn_recalib: Optional[bool] = typer.Option(
        None,
        "--bn-recalib/--no-bn-recalib",
        help="Re-estimate BatchNorm statistics on the calibration images afterwards.",
    ),
    prune_residual: Optional[bool] = typer.Option(
        None, "--prune-residual/--no-prune-residual", help="Also select residual-coupled stage widths."
    ),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="Calibration images from train."),
    device: Optional[str] = typer.Option(
        None, "--device", help="Where selection runs: cpu (default), cuda or auto (compress.device)."
    ),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Output directory (default runs/NAME)."),
    output: str = typer.Option("slim.pt", "--output", help="File name of the slim checkpoint in RUN_DIR."),
    sets: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Greedy channel selection and physical slimming of a trained model."""
    budget = any(v is not None for v in (eps, target_macs, target_params, target_latency))
    r = recipe_from_cli(
        recipe,
        sets,
        compress__criterion=criterion,
        compress__round_to=round_to,
        compress__latency__backend=latency_backend,
        compress__latency__table=str(latency_table) if latency_table else None,
        compress__min_width=min_width,
        compress__bn_recalib=bn_recalib,
        compress__prune_residual=prune_residual,
        data__calib_images=calib_images,
        compress__device=device,
        run_dir=str(run_dir) if run_dir else None,
    )
    if budget:  # an explicit budget option replaces whichever budget the recipe names
        from gslim.recipe import parse_recipe, recipe_to_dict

        data = recipe_to_dict(r)
        data["compress"].update(
            {
                "eps": eps,
                "target_macs": target_macs,
                "target_params": target_params,
                "target_latency": target_latency,
            }
        )
        r = parse_recipe(data, str(recipe or "options"))
    summary = compress_stage(
        r, r.resolved_run_dir(), model_path=model, out_name=output, force=force, progress=not no_progress
    )
    if "paths" in summary:  # under torchrun, rank 0 alone wrote the files and prints
        print_selection_table(summary)


def finetune_cmd(
    recipe: Optional[Path] = RecipeArg,
    model: Optional[Path] = typer.Option(
        None, "--model", help="Compressed checkpoint (default RUN_DIR/slim.pt)."
    ),
    teacher: Optional[Path] = typer.Option(
        None,
        "--teacher",
        help="Distillation teacher (default: the base model the slim model was compressed from).",
    ),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Distil from the teacher."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs."),
    lr: Optional[str] = typer.Option(
        None,
        "--lr",
        help="Peak learning rate at batch 256, or 'auto' (the default): the base's training lr times the "
        "factor of finetune.lr_probe_factors (0.5, 0.2, 0.08) that scores best on the held-out images "
        "after a short probe fine-tune each, tried with the recipe's distillation alpha/T and each pair "
        "of finetune.distill_probe (alpha 0.7, T 2); the best pair is used too (finetune.lr).",
    ),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Output directory (default runs/NAME)."),
    output: str = typer.Option("finetuned.pt", "--output", help="File name of the result in RUN_DIR."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/finetune_last.pt."),
    sets: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Recover accuracy of a compressed model, distilling from the original (torchrun works)."""
    r = recipe_from_cli(
        recipe, sets, finetune__epochs=epochs, finetune__lr=lr, run_dir=str(run_dir) if run_dir else None
    )
    if not distill:
        r.finetune.distill = None
    t0 = time.perf_counter()
    out = finetune_stage(
        r,
        r.resolved_run_dir(),
        model_path=model,
        teacher_path=teacher,
        out_name=output,
        resume=resume,
        force=force,
        progress=not no_progress,
    )
    m = out["metrics"]
    typer.echo(
        f"fine-tuned {out['epochs']} epoch(s) in {time.perf_counter() - t0:.0f} s: "
        f"top-1 {m.get('val_top1', float('nan')):.2f}% -> {out['model']}"
    )


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_cmd)
    app.command("finetune")(finetune_cmd)
