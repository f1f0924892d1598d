"""The compress and finetune stages of a recipe, callable from Python without the CLI:

from gslim.compress.stage import compress_stage, finetune_stage
summary = compress_stage(recipe, run_dir)          # slim.pt + selection.json
finetune_stage(recipe, run_dir)                    # finetuned.pt (distilled from the base)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Callable, Optional

try:
    import resource  # (POSIX only: the kernel-time hint is skipped elsewhere)
except ImportError:  # pragma: no cover
    resource = None

from gslim.environment import ensure_run_dir, environment_info
from gslim.errors import GslimError
from gslim.host_memory import kernel_time_hint
from gslim.progress import bar
from gslim.recipe import Recipe


def resolve_base_model(recipe: Recipe, run_dir: Path, model_path: Optional[Path]):
    """The uncompressed model: an explicit file, the recipe's weights, or the run's trained base."""
    from gslim.models import ModelSpec, build_model, load_model

    m = recipe.model
    if model_path is not None:
        model, spec = load_model(
            model_path, expect_arch=m.arch, num_classes=m.num_classes, input_size=m.input_size
        )
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


def compress_stage(
    recipe: Recipe,
    run_dir: Path,
    *,
    model_path: Optional[Path] = None,
    out_name: str = "slim.pt",
    selection_name: str = "selection.json",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Select and slim; write the slim checkpoint and selection.json. Returns the selection summary.

    Under torchrun every rank runs its share of the calibration batches and the statistics are
    summed across ranks (:mod:`gslim.compress.shard`); rank 0 writes the files (the summary of
    the other ranks has no ``paths``).
    """

    from gslim.compress.shard import Shard
    from gslim.train.distributed import barrier, cleanup_distributed, device_for, init_distributed

    device = device_for(recipe.compress.device)
    shard = Shard(init_distributed(device), device)  # Gloo on the CPU, NCCL on GPUs
    try:
        summary = _compress_stage(
            recipe, run_dir, model_path, out_name, selection_name, force, progress, shard
        )
        barrier(shard.info, device)  # the files exist for every rank from here on
        return summary
    finally:
        cleanup_distributed(shard.info)


def _compress_stage(
    recipe: Recipe,
    run_dir: Path,
    model_path: Optional[Path],
    out_name: str,
    selection_name: str,
    force: bool,
    progress: bool,
    shard,
) -> dict[str, Any]:
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

    if shard.enabled and recipe.compress.target_latency is not None:
        raise GslimError("a latency budget is measured in one process: run gslim compress without torchrun")
    progress = progress and shard.info.is_main
    latency_info = None
    # selection on the device; the base stays on the CPU for the latency loop and the summary
    work = model if shard.device.type == "cpu" else copy.deepcopy(model).to(shard.device)
    x, y = x.to(shard.device), y.to(shard.device)
    torch.set_flush_denormal(True)  # denormals from near-dead channels slow CPU convs several-fold
    cpu_before = resource.getrusage(resource.RUSAGE_SELF) if resource is not None else None
    try:
        with bar(progress, "selecting channels", None, unit="") as task:

            def run(latency=None, curves=None):
                result = compress_model(
                    work,
                    size,
                    x,
                    y,
                    recipe.compress,
                    seed=recipe.seed,
                    batch_size=min(recipe.data.batch_size, 128),
                    latency=latency,
                    curves=curves,
                    progress=lambda unit, done, total: task.update(done, total, unit=unit),
                    shard=shard,
                )
                result.model = result.model.cpu()
                return result

            if recipe.compress.target_latency is None:
                result = run()
            else:
                result, latency_info = compress_to_latency(recipe, model, size, run)
    finally:
        torch.set_flush_denormal(False)  # the process default; callers may compute on after us
    if cpu_before is not None and shard.device.type == "cpu" and shard.info.is_main:
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        hint = kernel_time_hint(
            cpu_after.ru_utime - cpu_before.ru_utime, cpu_after.ru_stime - cpu_before.ru_stime, "selection"
        )
        if hint:
            print(f"gslim: {hint}", file=sys.stderr, flush=True)
    macs1, params1 = count_macs_params(result.model, size)
    slim_spec = ModelSpec(
        spec.arch,
        spec.num_classes,
        size,
        widths=result.widths,
        meta={"base": source, "criterion": result.criterion, "stage": "compress"},
    )
    summary = {
        "base_model": source,
        "arch": spec.arch,
        "input_size": size,
        "macs_before": macs0,
        "macs_after": macs1,
        "macs_fraction": macs1 / macs0,
        "params_before": params0,
        "params_after": params1,
        "params_fraction": params1 / params0,
        "bn_recalib": recipe.compress.bn_recalib,
        "calibration_ranks": shard.info.world_size,
        "selection_device": str(shard.device),
        "config": recipe.compress.model_dump(mode="json"),
        **result.to_json(),
        **({"latency": latency_info} if latency_info is not None else {}),
        "environment": environment_info(),
    }
    if not shard.info.is_main:
        return summary
    # The model is written to its temporary file first and renamed last: a slim.pt on disk
    # always has its own selection.json next to it, whichever write fails.
    with atomic_path(out) as tmp:
        save_checkpoint(result.model, slim_spec, tmp)
        save_json(summary, sel_path)
    summary["paths"] = {"model": str(out), "selection": str(sel_path)}
    return summary


def finetune_stage(
    recipe: Recipe,
    run_dir: Path,
    *,
    model_path: Optional[Path] = None,
    teacher_path: Optional[Path] = None,
    out_name: str = "finetuned.pt",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
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
        teacher, teacher_spec = load_model(tpath, num_classes=spec.num_classes)
    base_meta = teacher_spec.meta if teacher is not None else _base_meta(spec)
    spec.meta = {**spec.meta, "stage": "finetune", "teacher": str(tpath) if teacher is not None else None}
    result = fit(
        model,
        spec,
        cfg,
        recipe.data,
        run_dir,
        seed=recipe.seed,
        teacher=teacher,
        resume=resume,
        force=force,
        output_name=out_name,
        log_name="finetune_log.jsonl",
        last_name="finetune_last.pt",
        progress=progress,
        description="finetune",
        lr_reference=base_training_lr(base_meta, recipe),
    )
    return {"model": str(result.final_path), "epochs": result.epochs, "metrics": result.metrics}


def _base_meta(spec) -> dict:
    """The base checkpoint's meta (what it was trained with), when the slim model names one."""
    from gslim.models import read_checkpoint

    base = (spec.meta or {}).get("base")
    if base and Path(base).is_file():
        try:
            return read_checkpoint(Path(base))[0].meta or {}
        except GslimError:  # not a gslim checkpoint (a torchvision file): nothing recorded
            return {}
    return {}


def base_training_lr(base_meta: Optional[dict], recipe: Recipe) -> dict:
    """How the base model was trained (peak lr at batch 256, optimizer): from its checkpoint when
    gslim trained it, else the recipe's train section. An 'auto' fine-tuning lr derives from it."""
    train = (base_meta or {}).get("train") or {}
    if isinstance(train.get("lr"), (int, float)) and train.get("optimizer"):
        return {"lr": float(train["lr"]), "optimizer": train["optimizer"], "source": "the base checkpoint"}
    cfg = recipe.train
    if cfg is None:
        return {}
    return {"lr": cfg.lr, "optimizer": cfg.optimizer, "source": "the recipe's train section"}


def compress_to_latency(
    recipe: Recipe,
    model,
    input_size: int,
    run: Callable[..., Any],
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
):
    """The closed loop of a latency budget: plan with the latency model, slim, measure the slim
    model against the base on the backend (interleaved), and move the planning target by
    budget/measured while it is over (or far under) the budget (at most
    ``compress.latency.max_rounds`` rounds, each printed). Returns the result and what goes into
    selection.json's ``latency``; ``prediction_error`` compares the prediction, made before the
    model was measured, with that measurement, both relative to the same session's full model."""
    import gslim.compress.latency as lat
    import gslim.compress.latency_table as lt
    from gslim.recipe import parse_latency

    cfg = recipe.compress.latency
    settings = lat.settings_from_recipe(recipe)
    table = lt.LatencyTable.open(settings, Path(cfg.table) if cfg.table else None)
    kind, value = parse_latency(recipe.compress.target_latency)
    say(
        f"latency budget {recipe.compress.target_latency} on {settings.backend} (batch {settings.batch}, "
        f"{settings.threads} thread(s), {settings.precision}); table {table.path}"
    )
    request = lat.LatencyRequest(
        settings,
        table,
        kind,
        value,
        progress=lambda done, total: (
            say(f"latency table: measured {done}/{total} layers") if done == total else None
        ),
    )
    rounds, curves, best = [], None, None
    for r in range(1, cfg.max_rounds + 1):
        result = run(latency=request, curves=curves)
        curves = result.curves
        lm = request.built
        predicted = lm.predict(result.widths)
        m = lt.measure_model(result.model, input_size, settings, others={"base": model})
        slim_ms, base_now = m["model"], m["base"]
        budget_ms = value if kind == "ms" else value * base_now
        # the prediction in this session's terms: the full model drifts between sessions by a few
        # percent on a shared machine, the predicted fraction of it does not
        predicted_now = predicted * base_now / lm.full_ms
        rounds.append(
            {
                "round": r,
                "planning_target_ms": request.target_ms,
                "predicted_ms": predicted,
                "predicted_session_ms": predicted_now,
                "measured_ms": slim_ms,
                "base_measured_ms": base_now,
                "budget_ms": budget_ms,
            }
        )
        say(
            f"latency round {r}: predicted {predicted:.3f} ms, measured {slim_ms:.3f} ms "
            f"(base {base_now:.3f} ms, {base_now / slim_ms:.2f}x), budget {budget_ms:.3f} ms"
        )
        fits = slim_ms <= budget_ms * (1 + cfg.tolerance)
        if fits and (best is None or slim_ms > best[1]["measured_ms"]):
            best = (result, rounds[-1])  # the widest model that fits: the least accuracy given up
        if fits and slim_ms >= budget_ms * (1 - cfg.undershoot):
            break
        if r < cfg.max_rounds:  # over: tighten; far under: loosen (the ratio by which it missed)
            request.scale *= budget_ms / slim_ms
    if best is None:
        raise GslimError(
            f"the slim model measures {slim_ms:.3f} ms, over the budget {budget_ms:.3f} ms, after "
            f"{len(rounds)} round(s); raise compress.latency.max_rounds or the budget"
        )
    result, last = best
    return result, {
        "budget": recipe.compress.target_latency,
        "kind": kind,
        "budget_ms": last["budget_ms"],
        "backend": settings.backend,
        "batch": settings.batch,
        "threads": settings.threads,
        "precision": settings.precision,
        "base_ms": last["base_measured_ms"],
        "predicted_ms": last["predicted_ms"],
        "measured_ms": last["measured_ms"],
        "predicted_session_ms": last["predicted_session_ms"],
        "prediction_error": (last["predicted_session_ms"] - last["measured_ms"]) / last["measured_ms"],
        "speedup": last["base_measured_ms"] / last["measured_ms"],
        "rounds": rounds,
        "table": {"path": str(table.path), "entries": len(table.entries), "measured_now": table.measured_now},
        "model": request.built.describe(),
    }
