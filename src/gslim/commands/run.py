"""`gslim run RECIPE`: train (when asked) → compress → finetune → export → profile → report.

Everything lands in one run directory. Each stage is skipped when its finished artifact
is already there, so an interrupted run resumes where it stopped; ``--force`` redoes all.

    RUN_DIR/
      run.json                     resolved recipe, environment, stage timings, headline numbers
      base.pt                      trained base model (only when the recipe has a train section)
      slim.pt, selection.json      the main budget, one-shot (selection + slimming + BN re-calibration)
      finetuned.pt                 the main budget after fine-tuning with distillation
      export/base/, export/main/   model.onnx (+ fp16 / int8 / engine) and parity.json
      sweep/<budget>/              the same for each extra budget of the trade-off plot
      report/                      latency.json, report.json, report.md, tradeoff.png
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from gslim.commands.common import ForceOpt, SetOpt, ensure_run_dir, environment_info, recipe_from_cli
from gslim.errors import GslimError
from gslim.recipe import Recipe, _parse_budget


def _log(msg: str) -> None:
    typer.echo(f"[gslim run] {msg}", err=True)


def _stage(name: str, done: bool, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    if done:
        _log(f"{name}: finished artifacts exist, skipping (use --force to redo)")
        return None
    _log(f"{name}: starting")
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    _log(f"{name}: done in {timings[name]:.0f} s")
    return out


def _budget_label(value: Any) -> str:
    v = _parse_budget(value)
    return f"macs{round(100 * v)}" if v <= 1 else f"macs{int(v)}"


def _one_shot_top1(path: Path, recipe: Recipe) -> Optional[float]:
    from gslim.models import load_model
    from gslim.train import evaluate_on_recipe

    model, _ = load_model(path)
    return evaluate_on_recipe(model, recipe, limit=recipe.profile.eval_images)["top1"]


def run_pipeline(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    from gslim.artifacts import load_json, save_json
    from gslim.commands.compress import compress_stage, finetune_stage
    from gslim.commands.export import export_stage
    from gslim.commands.profile import profile_stage
    from gslim.models import ModelSpec, build_model
    from gslim.profiling import ArtifactSet
    from gslim.recipe import recipe_to_dict

    run_dir = ensure_run_dir(recipe.resolved_run_dir())
    timings: dict[str, float] = {}
    run_info: dict[str, Any] = {"recipe": recipe_to_dict(recipe), "environment": environment_info(),
                                "timings": timings}
    if (run_dir / "run.json").is_file() and not force:
        previous = load_json(run_dir / "run.json")
        if previous.get("recipe") != run_info["recipe"]:
            raise GslimError(f"{run_dir} holds a run of a different recipe; use another run_dir or --force")
    save_json(run_info, run_dir / "run.json")

    # 1. the base model
    base_path = run_dir / "base.pt"
    if recipe.train is not None:
        from gslim.train import fit

        def train() -> Any:
            model = build_model(recipe.model.arch, recipe.model.num_classes, recipe.model.weights)
            spec = ModelSpec(recipe.model.arch, recipe.model.num_classes, recipe.model.input_size,
                             meta={"stage": "train"})
            return fit(model, spec, recipe.train, recipe.data, run_dir, seed=recipe.seed, resume=not force,
                       force=force, output_name="base.pt", progress=progress)

        _stage("train", base_path.is_file() and not force, train, timings)
    elif recipe.model.weights is None:
        raise GslimError("the recipe has neither model.weights nor a train section: there is no base model")
    else:
        base_path = None  # compress_stage builds it from model.weights

    # 2-4. compress, finetune, export for the main budget and each sweep budget
    budgets: list[tuple[str, Path, Recipe]] = [("main", run_dir, recipe)]
    for b in recipe.sweep or []:
        label = _budget_label(b)
        data = recipe_to_dict(recipe)
        data["compress"].update({"eps": None, "target_params": None, "target_macs": b})
        budgets.append((label, run_dir / "sweep" / label, Recipe.model_validate(data)))

    results: dict[str, Any] = {}
    for label, out_dir, r in budgets:
        ensure_run_dir(out_dir)
        _stage(f"compress[{label}]", (out_dir / "slim.pt").is_file() and not force,
               lambda: compress_stage(r, out_dir, model_path=base_path, force=force, progress=progress), timings)
        selection = load_json(out_dir / "selection.json")
        one_shot_file = out_dir / "one_shot.json"
        if force or not one_shot_file.is_file():
            save_json({"top1": _one_shot_top1(out_dir / "slim.pt", r)}, one_shot_file)
        teacher = base_path if base_path is not None else None
        _stage(f"finetune[{label}]", (out_dir / "finetuned.pt").is_file() and not force,
               lambda: finetune_stage(r, out_dir, model_path=out_dir / "slim.pt", teacher_path=teacher,
                                      resume=not force, force=force, progress=progress), timings)
        results[label] = {"dir": str(out_dir), "macs_fraction": selection["macs_fraction"],
                          "params_fraction": selection["params_fraction"],
                          "one_shot_top1": load_json(one_shot_file)["top1"],
                          "target": selection.get("budget", {}) and selection["budget"].get("target_fraction"),
                          "finetune": _finetune_summary(out_dir / "finetuned.pt")}

    exports: dict[str, dict] = {}
    to_export = [("base", base_path)] if base_path is not None else []
    to_export += [(label, out_dir / "finetuned.pt") for label, out_dir, _ in budgets]
    for label, ckpt in to_export:
        edir = run_dir / "export" / label
        onnx = edir / "model.onnx"
        _stage(f"export[{label}]", onnx.is_file() and not force,
               lambda: export_stage(ckpt, recipe, edir, force=force, progress=progress), timings)
        exports[label] = {"dir": edir, "onnx": onnx,
                          "engine": edir / "model.engine" if (edir / "model.engine").is_file() else None,
                          "int8": edir / "model.int8.onnx" if (edir / "model.int8.onnx").is_file() else None}

    # 5. profile and report
    artifacts = []
    int8_sets = []
    if base_path is not None:
        artifacts.append(ArtifactSet("base", "base", base_path, exports["base"]["onnx"], exports["base"]["engine"]))
        int8_sets.append(("base", "base", {}))
    for label, out_dir, r in budgets:
        frac = results[label]["macs_fraction"]
        name = f"{r.compress.criterion} {100 * frac:.0f}% MACs"
        extra = {"criterion": r.compress.criterion, "macs_fraction": round(frac, 4)}
        ft = results[label]["finetune"]
        artifacts.append(ArtifactSet(name, "compressed", out_dir / "finetuned.pt", exports[label]["onnx"],
                                     exports[label]["engine"],
                                     extra={**extra, "one_shot_top1": results[label]["one_shot_top1"],
                                            **({"finetune_kept": ft["kept"]} if ft.get("kept") else {})}))
        int8_sets.append((label, name, extra))
    # the Q/DQ INT8 ONNX of each model, beside its FP32 row (ONNX backends only: the PyTorch
    # backends have no INT8 form of it and say so)
    for label, name, extra in int8_sets:
        if exports[label]["int8"] is not None:
            artifacts.append(ArtifactSet(f"{name} INT8", "compressed", None, exports[label]["int8"], None,
                                         extra={**extra, "precision": "int8", "fp32_of": name}))
    report_dir = run_dir / "report"
    summary = _stage("profile", (report_dir / "report.md").is_file() and not force,
                     lambda: profile_stage(artifacts, recipe, report_dir, force=force, progress=progress), timings)
    run_info["budgets"] = results
    run_info["report"] = str(report_dir / "report.md")
    save_json(run_info, run_dir / "run.json")
    return {"run_dir": str(run_dir), "report": str(report_dir / "report.md"), "budgets": results,
            "profile": summary, "timings": timings}


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML describing the whole run (see configs/demo.yaml)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME)."),
        sets: Optional[list[str]] = SetOpt,
        force: bool = ForceOpt,
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    ) -> None:
        """Run the whole pipeline: train (if asked) → compress → finetune → export → profile → report."""
        r = recipe_from_cli(recipe, sets, run_dir=str(run_dir) if run_dir else None)
        t0 = time.perf_counter()
        out = run_pipeline(r, force=force, progress=not no_progress)
        report = Path(out["report"])
        if report.is_file():
            typer.echo(report.read_text())
        typer.echo(f"\nrun finished in {time.perf_counter() - t0:.0f} s; report: {report} "
                   f"(plot: {report.parent / 'tradeoff.png'})")


def _finetune_summary(path: Path) -> dict[str, Any]:
    """Which fine-tuning checkpoint was kept (held-out selection), from the checkpoint's meta."""
    from gslim.models import read_checkpoint

    spec, _ = read_checkpoint(path)
    train = (spec.meta or {}).get("train") or {}
    sel = train.get("selection")
    out: dict[str, Any] = {"val_top1": train.get("val_top1"), "selection": sel}
    if sel and sel.get("kept"):
        k, start = sel["kept"], sel.get("start") or {}
        out["kept"] = ("start (one-shot model)" if sel.get("kept_start") else f"step {k['step']}") + \
            f", holdout {k['holdout_top1']:.2f}% (start {start.get('holdout_top1', float('nan')):.2f}%)"
    return out
