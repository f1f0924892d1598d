"""`gslim run RECIPE` as a library call: train (when asked) → compress → finetune → export →
profile → report, all in one run directory.

    from gslim.pipeline import run_pipeline
    run_pipeline(load_recipe("configs/demo.yaml"))

Each stage is skipped when its finished artifact is already there, so an interrupted run
resumes where it stopped; ``force`` redoes all.

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

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gslim.environment import ensure_run_dir, environment_info
from gslim.errors import GslimError
from gslim.recipe import Recipe, parse_budget, parse_latency


def _log(msg: str) -> None:
    print(f"[gslim run] {msg}", file=sys.stderr, flush=True)


@dataclass
class _Pipeline:
    recipe: Recipe
    run_dir: Path
    force: bool
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, done: bool, fn: Callable[[], Any]) -> Any:
        if done and not self.force:
            _log(f"{name}: finished artifacts exist, skipping (use --force to redo)")
            return None
        _log(f"{name}: starting")
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: done in {self.timings[name]:.0f} s")
        return out


@dataclass
class _Budget:
    label: str  # "main", or the sweep budget's label (macs50, ...)
    dir: Path
    recipe: Recipe


def run_pipeline(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every stage of ``recipe``; returns the run directory, the report path, the per-budget
    headline numbers, the profile summary and the stage timings."""
    from gslim.artifacts import save_json
    from gslim.recipe import recipe_to_dict

    p = _Pipeline(recipe, ensure_run_dir(recipe.resolved_run_dir()), force, progress)
    run_info: dict[str, Any] = {
        "recipe": recipe_to_dict(recipe),
        "environment": environment_info(),
        "timings": p.timings,
    }
    _check_same_recipe(p, run_info["recipe"])
    save_json(run_info, p.run_dir / "run.json")

    base_path = _base_model(p)
    budgets = _budgets(p)
    results = {b.label: _compress_and_finetune(p, b, base_path) for b in budgets}
    exports = _export_all(p, base_path, budgets)
    report_dir = p.run_dir / "report"
    summary = _profile(p, base_path, budgets, results, exports, report_dir)
    run_info["budgets"] = results
    run_info["report"] = str(report_dir / "report.md")
    save_json(run_info, p.run_dir / "run.json")
    return {
        "run_dir": str(p.run_dir),
        "report": str(report_dir / "report.md"),
        "budgets": results,
        "profile": summary,
        "timings": p.timings,
    }


def _check_same_recipe(p: _Pipeline, recipe_dict: dict) -> None:
    from gslim.artifacts import load_json

    if (p.run_dir / "run.json").is_file() and not p.force:
        previous = load_json(p.run_dir / "run.json")
        if previous.get("recipe") != recipe_dict:
            raise GslimError(f"{p.run_dir} holds a run of a different recipe; use another run_dir or --force")


def _base_model(p: _Pipeline) -> Optional[Path]:
    """Train the base (the same train stage as ``gslim train``), or None: compress builds it from
    ``model.weights``."""
    from gslim.train.stage import BASE_MODEL, train_stage

    base_path = p.run_dir / BASE_MODEL
    if p.recipe.train is not None:
        p.stage(
            "train",
            base_path.is_file(),
            lambda: train_stage(
                p.recipe, p.run_dir, resume=not p.force, force=p.force, progress=p.progress, command="run"
            ),
        )
        return base_path
    if p.recipe.model.weights is None:
        raise GslimError("the recipe has neither model.weights nor a train section: there is no base model")
    return None


def budget_label(value: Any, latency: bool = False) -> str:
    """A sweep budget's directory name: macs50, macs320000000, lat50, lat2.5ms."""
    if latency:
        kind, v = parse_latency(value)
        return f"lat{round(100 * v)}" if kind == "fraction" else f"lat{v:g}ms"
    v = parse_budget(value)
    return f"macs{round(100 * v)}" if v <= 1 else f"macs{int(v)}"


def _budgets(p: _Pipeline) -> list[_Budget]:
    """The main budget and one per sweep value (each a recipe with that MACs target)."""
    from gslim.recipe import recipe_to_dict

    out = [_Budget("main", p.run_dir, p.recipe)]
    latency = p.recipe.compress.target_latency is not None  # sweep budgets are of the main budget's kind
    for b in p.recipe.sweep or []:
        label = budget_label(b, latency)
        data = recipe_to_dict(p.recipe)
        data["compress"].update(
            {
                "eps": None,
                "target_params": None,
                "target_macs": None,
                "target_latency": None,
                ("target_latency" if latency else "target_macs"): b,
            }
        )
        out.append(_Budget(label, p.run_dir / "sweep" / label, Recipe.model_validate(data)))
    return out


def _compress_and_finetune(p: _Pipeline, b: _Budget, base_path: Optional[Path]) -> dict[str, Any]:
    from gslim.artifacts import load_json, save_json
    from gslim.compress.stage import compress_stage, finetune_stage

    ensure_run_dir(b.dir)
    p.stage(
        f"compress[{b.label}]",
        (b.dir / "slim.pt").is_file(),
        lambda: compress_stage(b.recipe, b.dir, model_path=base_path, force=p.force, progress=p.progress),
    )
    selection = load_json(b.dir / "selection.json")
    one_shot_file = b.dir / "one_shot.json"
    if p.force or not one_shot_file.is_file():
        save_json({"top1": _one_shot_top1(b.dir / "slim.pt", b.recipe)}, one_shot_file)
    p.stage(
        f"finetune[{b.label}]",
        (b.dir / "finetuned.pt").is_file(),
        lambda: finetune_stage(
            b.recipe,
            b.dir,
            model_path=b.dir / "slim.pt",
            teacher_path=base_path,
            resume=not p.force,
            force=p.force,
            progress=p.progress,
        ),
    )
    lat = selection.get("latency")
    return {
        "dir": str(b.dir),
        "macs_fraction": selection["macs_fraction"],
        "params_fraction": selection["params_fraction"],
        "latency": {
            k: lat[k]
            for k in (
                "budget",
                "budget_ms",
                "predicted_ms",
                "measured_ms",
                "base_ms",
                "prediction_error",
                "speedup",
                "backend",
            )
        }
        if lat
        else None,
        "one_shot_top1": load_json(one_shot_file)["top1"],
        "target": selection.get("budget", {}) and selection["budget"].get("target_fraction"),
        "finetune": finetune_summary(b.dir / "finetuned.pt"),
    }


def _one_shot_top1(path: Path, recipe: Recipe) -> Optional[float]:
    from gslim.models import load_model
    from gslim.train import evaluate_on_recipe

    model, _ = load_model(path)
    if recipe.profile.eval_images == 0:
        return None
    return evaluate_on_recipe(model, recipe, limit=recipe.profile.eval_images)["top1"]


def finetune_summary(path: Path) -> dict[str, Any]:
    """Which fine-tuning checkpoint was kept (held-out selection), from the checkpoint's meta."""
    from gslim.models import read_checkpoint

    spec, _ = read_checkpoint(path)
    train = (spec.meta or {}).get("train") or {}
    sel = train.get("selection")
    out: dict[str, Any] = {"val_top1": train.get("val_top1"), "selection": sel}
    if sel and sel.get("kept"):
        k, start = sel["kept"], sel.get("start") or {}
        out["kept"] = (
            "start (one-shot model)" if sel.get("kept_start") else f"step {k['step']}"
        ) + f", holdout {k['holdout_top1']:.2f}% (start {start.get('holdout_top1', float('nan')):.2f}%)"
        rule = sel.get("lr") or {}
        if rule.get("distill"):  # what the held-out probe chose (gslim.train.finetune_lr)
            d = rule["distill"]
            out["kept"] += f"; lr {rule['lr']:.3g}, distillation alpha {d['alpha']:g}, T {d['temperature']:g}"
    return out


def _export_all(p: _Pipeline, base_path: Optional[Path], budgets: list[_Budget]) -> dict[str, dict]:
    from gslim.export.stage import export_stage

    exports: dict[str, dict] = {}
    to_export = [("base", base_path)] if base_path is not None else []
    to_export += [(b.label, b.dir / "finetuned.pt") for b in budgets]
    for label, ckpt in to_export:
        edir = p.run_dir / "export" / label
        onnx = edir / "model.onnx"
        p.stage(
            f"export[{label}]",
            onnx.is_file(),
            lambda: export_stage(ckpt, p.recipe, edir, force=p.force, progress=p.progress),
        )
        exports[label] = {
            "dir": edir,
            "onnx": onnx,
            "engine": edir / "model.engine" if (edir / "model.engine").is_file() else None,
            "int8": edir / "model.int8.onnx" if (edir / "model.int8.onnx").is_file() else None,
        }
    return exports


def _profile(
    p: _Pipeline,
    base_path: Optional[Path],
    budgets: list[_Budget],
    results: dict,
    exports: dict,
    report_dir: Path,
) -> Any:
    from gslim.profiling import ArtifactSet
    from gslim.profiling.stage import profile_stage

    artifacts = []
    int8_sets = []
    if base_path is not None:
        artifacts.append(
            ArtifactSet("base", "base", base_path, exports["base"]["onnx"], exports["base"]["engine"])
        )
        int8_sets.append(("base", "base", {}))
    for b in budgets:
        frac = results[b.label]["macs_fraction"]
        lat = results[b.label]["latency"]
        name = f"{b.recipe.compress.criterion} {100 * frac:.0f}% MACs"
        extra = {"criterion": b.recipe.compress.criterion, "macs_fraction": round(frac, 4)}
        if lat:  # named by its latency budget; the notes say budget, predicted and measured
            name = f"{b.recipe.compress.criterion} {lat['budget']} latency"
            extra.update(
                {
                    "latency_budget_ms": round(lat["budget_ms"], 3),
                    "latency_predicted_ms": round(lat["predicted_ms"], 3),
                    "latency_measured_ms": round(lat["measured_ms"], 3),
                    "latency_backend": lat["backend"],
                }
            )
        ft = results[b.label]["finetune"]
        artifacts.append(
            ArtifactSet(
                name,
                "compressed",
                b.dir / "finetuned.pt",
                exports[b.label]["onnx"],
                exports[b.label]["engine"],
                extra={
                    **extra,
                    "one_shot_top1": results[b.label]["one_shot_top1"],
                    **({"finetune_kept": ft["kept"]} if ft.get("kept") else {}),
                },
            )
        )
        int8_sets.append((b.label, name, extra))
    # the Q/DQ INT8 ONNX of each model, beside its FP32 row (ONNX backends only: the PyTorch
    # backends have no INT8 form of it and say so)
    for label, name, extra in int8_sets:
        if exports[label]["int8"] is not None:
            artifacts.append(
                ArtifactSet(
                    f"{name} INT8",
                    "compressed",
                    None,
                    exports[label]["int8"],
                    None,
                    extra={**extra, "precision": "int8", "fp32_of": name},
                )
            )
    return p.stage(
        "profile",
        (report_dir / "report.md").is_file(),
        lambda: profile_stage(artifacts, p.recipe, report_dir, force=p.force, progress=p.progress),
    )
