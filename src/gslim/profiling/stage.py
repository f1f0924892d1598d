"""The profile stage: latency (interleaved, per backend and batch), accuracy, report and plot.

:func:`profile_stage` is what ``gslim profile`` and ``gslim run`` call. It measures every
backend in ``recipe.profile.backends`` × ``recipe.profile.batch_sizes``; for each backend and
batch, the base and compressed artifacts are timed in the same process in alternating rounds
(:func:`gslim.profiling.measure.measure_interleaved`). Each artifact's top-1 is scored through
the same backend. Backends that cannot run here (no CUDA, no TensorRT, no matching file) are
recorded as skipped with their reason; nothing is estimated or faked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from gslim.environment import environment_info
from gslim.errors import GslimError, first_line
from gslim.profiling import ROLES, ArtifactSet
from gslim.profiling.artifacts import OUTPUT_NAMES, common_value, describe_artifact
from gslim.progress import Display, Task
from gslim.recipe import Recipe, recipe_to_dict


def _updater(task: Task) -> Callable[[int], None]:
    """A callback that sets a bar's count (and removes the bar once it is full)."""
    return lambda done: task.update(done, remove=True)


class _Counter:
    """Accumulates per-batch counts into a progress callback."""

    def __init__(self, update: Callable[[int], None]):
        self.seen, self.update = 0, update

    def __call__(self, n: int) -> None:
        self.seen += n
        self.update(self.seen)


# ----------------------------------------------------------------------------- the stage


def _result(
    backend: str, a: ArtifactSet, batch: int, status: str, reason: Optional[str] = None, **more: Any
) -> dict[str, Any]:
    return {
        "backend": backend,
        "batch": batch,
        "label": a.label,
        "role": a.role,
        "status": status,
        "reason": reason,
        **more,
    }


@dataclasses.dataclass
class _Context:
    """What every backend of one profile shares."""

    recipe: Recipe
    options: Any  # BackendOptions
    loader: Any  # the validation images, or None: accuracy is not measured
    eval_limit: int
    clock: Callable[[], float]
    ui: Display
    warnings: list[str]
    versions: dict[str, Any]
    accuracy_off: Optional[str] = None  # why accuracy is not measured

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.ui.warn(message)


def _why(exc: BaseException) -> str:
    """One line: a GslimError's message, or the type and first line of a runtime error."""
    return first_line(exc, with_type=not isinstance(exc, GslimError))


def _profile_backend(name: str, artifacts: list[ArtifactSet], ctx: _Context) -> tuple[list[dict], list[dict]]:
    from gslim.runtime import get_backend

    cls = get_backend(name)
    results: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []

    def skip_all(a: ArtifactSet, status: str, reason: str) -> None:
        for b in ctx.recipe.profile.batch_sizes:
            results.append(_result(name, a, b, status, reason))
        accuracy.append({"backend": name, "label": a.label, "top1": None, "images": 0, "reason": reason})

    ok, reason = cls.available()
    if not ok:
        for a in artifacts:
            skip_all(a, "skipped", reason)
        return results, accuracy
    with contextlib.ExitStack() as stack:
        active = _open_backends(cls, artifacts, ctx, stack, skip_all)
        by_label = {a.label: a for a in artifacts}
        accuracy += _score_accuracy(name, active, ctx)  # also warms the backends up
        for batch in ctx.recipe.profile.batch_sizes:
            results += _time_batch(name, batch, active, by_label, ctx)
    return results, accuracy


def _open_backends(
    cls,
    artifacts: list[ArtifactSet],
    ctx: _Context,
    stack: contextlib.ExitStack,
    skip_all: Callable[[ArtifactSet, str, str], None],
) -> dict[str, Any]:
    """label -> an activated backend, for every artifact that this runtime can run."""
    from gslim.runtime import ARTIFACT_SUFFIX, BackendUnavailable

    name = cls.name
    active: dict[str, Any] = {}
    for a in artifacts:
        path = a.path_for(cls.artifact)
        if path is None:
            skip_all(a, "skipped", f"no {ARTIFACT_SUFFIX[cls.artifact]} file for {a.label!r}")
            continue
        opts = dataclasses.replace(ctx.options, precision_hint=a.extra.get("precision"))
        backend = cls(path, opts)
        try:
            stack.enter_context(backend)
        except BackendUnavailable as exc:
            skip_all(a, "skipped", str(exc).removeprefix(f"{name}: "))
            continue
        except (GslimError, RuntimeError) as exc:  # runtime errors: a bad artifact, out of memory
            msg = _why(exc).removeprefix(f"{name}: ")
            skip_all(a, "failed", msg)
            ctx.warn(f"{name}: {a.label}: {msg}")
            continue
        active[a.label] = backend
    return active


def _score_accuracy(name: str, active: dict[str, Any], ctx: _Context) -> list[dict[str, Any]]:
    from gslim.profiling.measure import top1_accuracy

    out = []
    for label, backend in active.items():
        if ctx.loader is None:
            out.append(
                {"backend": name, "label": label, "top1": None, "images": 0, "reason": ctx.accuracy_off}
            )
            continue
        total = min(ctx.eval_limit, len(ctx.loader.dataset))
        update = _updater(ctx.ui.task(f"{name} top-1 {label}", total))
        try:
            top1, n = top1_accuracy(
                backend.infer, ctx.loader, limit=ctx.eval_limit, on_batch=_Counter(update)
            )
            out.append({"backend": name, "label": label, "top1": top1, "images": n, "reason": None})
        except (GslimError, RuntimeError) as exc:
            update(total)
            out.append({"backend": name, "label": label, "top1": None, "images": 0, "reason": _why(exc)})
            ctx.warn(f"{name}: accuracy of {label}: {_why(exc)}")
    return out


def _time_batch(
    name: str, batch: int, active: dict[str, Any], by_label: dict[str, ArtifactSet], ctx: _Context
) -> list[dict[str, Any]]:
    """Every active artifact at one batch size, timed in interleaved rounds."""
    from gslim.profiling.measure import MeasureSettings, measure_interleaved
    from gslim.runtime import BatchUnsupported

    results: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}
    for label, backend in active.items():
        try:
            backend.prepare(batch)
            runners[label] = backend
        except BatchUnsupported as exc:
            results.append(_result(name, by_label[label], batch, "skipped", str(exc)))
        except (GslimError, RuntimeError) as exc:
            results.append(_result(name, by_label[label], batch, "failed", _why(exc)))
            ctx.warn(f"{name} b={batch}: {label}: {_why(exc)}")
    if not runners:
        return results
    settings = MeasureSettings.from_profile(ctx.recipe.profile)
    update = _updater(ctx.ui.task(f"{name} b={batch} rounds", settings.rounds))
    samples = measure_interleaved(runners, settings, clock=ctx.clock, on_round=lambda d, t: update(d))
    base_label = next((lb for lb in runners if by_label[lb].role == "base"), None)
    for label, smp in samples.items():
        base = samples[base_label] if base_label is not None and label != base_label else None
        results.append(_timed_result(name, batch, by_label[label], runners[label], smp, base, ctx))
    return results


def _timed_result(
    name: str, batch: int, a: ArtifactSet, backend: Any, smp: Any, base: Any, ctx: _Context
) -> dict[str, Any]:
    from gslim.profiling.measure import CV_WARN, speedup, summarize

    lat = summarize(smp.primary, batch)
    e2e = summarize(smp.e2e, batch) if smp.e2e else None
    sp: dict[str, Any] = {
        "speedup": None,
        "speedup_round_min": None,
        "speedup_round_max": None,
        "speedup_rounds": 0,
        "speedup_e2e": None,
    }
    if base is not None:
        s = speedup(base, smp)
        sp = {
            "speedup": s["speedup"],
            "speedup_round_min": s["speedup_round_min"],
            "speedup_round_max": s["speedup_round_max"],
            "speedup_rounds": s["rounds"],
            "speedup_e2e": None,
        }
        if e2e is not None and base.e2e:
            sp["speedup_e2e"] = summarize(base.e2e)["median_ms"] / e2e["median_ms"]
    desc = backend.describe()
    if lat["noisy"]:
        ctx.warn(
            f"{name} b={batch} {a.label}: CV {lat['cv']:.2f} > {CV_WARN:g} — noisy measurement; "
            "raise --min-seconds or use a quieter machine"
        )
    return _result(
        name,
        a,
        batch,
        "ok",
        None,
        precision=desc["precision"],
        device=desc["device"],
        runtime=desc["runtime"],
        versions=ctx.versions,
        options=desc.get("options", {}),
        notes=desc["notes"],
        timing=desc["timing"],
        latency_ms=lat,
        e2e_ms=e2e,
        throughput=lat["throughput"],
        noisy=lat["noisy"],
        **sp,
        warmup={"iters": smp.warmup_iters, "seconds": smp.warmup_s},
        timed_s=smp.timed_s,
        samples_ms=[t * 1e3 for t in smp.primary],
        e2e_samples_ms=[t * 1e3 for t in smp.e2e] if smp.e2e else None,
        round_index=smp.round_index,
    )


def profile_stage(
    artifacts: list[ArtifactSet],
    recipe: Recipe,
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    backend_options: Optional[dict[str, Any]] = None,
    clock: Optional[Callable[[], float]] = None,
    accuracy: bool = True,
) -> dict[str, Any]:
    """Measure every backend × batch (base and compressed interleaved), score top-1, write the report.

    Writes ``out_dir/{latency.json, report.json, report.md, tradeoff.png}`` and returns a summary
    with their paths, the compact results and the warnings. ``backend_options`` overrides fields
    of :class:`gslim.runtime.BackendOptions` (e.g. ``{"cuda_graphs": True}``); ``clock``
    replaces ``time.perf_counter`` (tests). ``accuracy=False`` (or ``profile.eval_images: 0``)
    measures latency only: top-1 is reported as not measured. A recipe whose class count
    differs from the models' outputs is an error, never a score on the wrong labels.
    """
    from gslim import __version__
    from gslim.artifacts import refuse_overwrite
    from gslim.profiling.measure import CV_WARN
    from gslim.profiling.report import REPORT_FORMAT, REPORT_VERSION, strip_samples, write_reports

    _check_artifacts(artifacts)
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in OUTPUT_NAMES.items()}
    refuse_overwrite(paths["report_json"], force, "profile report")
    refuse_overwrite(paths["latency"], force, "latency measurement")
    cfg = recipe.profile
    started = time.time()

    infos = [describe_artifact(a) for a in artifacts]
    input_size = common_value(infos, "input_size", recipe.model.input_size, "input size")
    num_classes = common_value(infos, "num_classes", recipe.model.num_classes, "number of classes")
    accuracy_off = (
        None
        if accuracy and cfg.eval_images != 0
        else (
            "not measured: no recipe names the validation data (pass --recipe)"
            if not accuracy
            else "not measured (profile.eval_images is 0)"
        )
    )
    loader, eval_limit, eval_batch = (
        _eval_loader(recipe, input_size, num_classes)
        if accuracy_off is None
        else (None, 0, recipe.data.eval_batch_size or recipe.data.batch_size)
    )
    options = _backend_options(recipe, out_dir, input_size, num_classes, eval_batch, backend_options)
    env = environment_info()
    if env.get("gpu"):
        from gslim.profiling.gpu_context import driver_version

        env["driver"] = driver_version()
    versions = {k: env.get(k) for k in ("python", "torch", "torchvision", "onnx", "onnxruntime", "tensorrt")}

    results: list[dict[str, Any]] = []
    accuracy_rows: list[dict[str, Any]] = []
    with Display(progress) as ui:
        ctx = _Context(
            recipe, options, loader, eval_limit, clock or time.perf_counter, ui, [], versions, accuracy_off
        )
        for name in dict.fromkeys(cfg.backends):  # de-duplicated, in order
            r, acc = _profile_backend(name, artifacts, ctx)
            results += r
            accuracy_rows += acc
    settings = {**cfg.model_dump(mode="json"), "cv_warn": CV_WARN, "eval_batch_size": eval_batch}
    common = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "gslim": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": settings,
        "eval_images": eval_limit,
        "data": recipe.data.kind if accuracy_off is None else None,
        "input_size": input_size,
        "num_classes": num_classes,
        "artifacts": infos,
        "accuracy": accuracy_rows,
        "warnings": ctx.warnings,
        "paths": {k: str(p) for k, p in paths.items()},
        "elapsed_s": round(time.time() - started, 2),
    }
    latency = {**common, "results": results, "recipe": recipe_to_dict(recipe)}
    report = {**common, "results": strip_samples(results)}
    write_reports(report, latency, out_dir, paths)
    return {
        "out_dir": str(out_dir),
        "paths": {k: str(p) for k, p in paths.items()},
        "measured": sum(r["status"] == "ok" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "results": [_compact(r, accuracy_rows) for r in results],
        "accuracy": accuracy_rows,
        "warnings": ctx.warnings,
        "elapsed_s": common["elapsed_s"],
    }


def _check_artifacts(artifacts: list[ArtifactSet]) -> None:
    if not artifacts:
        raise GslimError("profile: no artifacts to profile")
    labels = [a.label for a in artifacts]
    if len(set(labels)) != len(labels):
        raise GslimError(f"profile: artifact labels must be unique, got {', '.join(labels)}")
    for a in artifacts:
        if a.role not in ROLES:
            raise GslimError(f"profile: artifact {a.label!r} has role {a.role!r}; use 'base' or 'compressed'")
    if sum(a.role == "base" for a in artifacts) > 1:
        raise GslimError("profile: more than one artifact has the role 'base'")


def _eval_loader(recipe: Recipe, input_size: int, num_classes: int):
    """The validation images, scored identically through every backend: (loader, count, batch)."""
    from torch.utils.data import Subset

    from gslim.data import data_classes, make_dataset, make_loader

    ds = make_dataset(recipe.data, "val", input_size, num_classes, recipe.seed)
    classes = data_classes(recipe.data, ds)
    if classes is not None and classes != num_classes:
        raise GslimError(
            f"the models output {num_classes} classes but the recipe's {recipe.data.kind} data has "
            f"{classes}: top-1 would be scored on the wrong labels; use the recipe the models were "
            "trained with, or --eval-images 0"
        )
    eval_limit = min(recipe.profile.eval_images or recipe.data.val_images or len(ds), len(ds))
    ds = Subset(ds, range(eval_limit))
    eval_batch = recipe.data.eval_batch_size or recipe.data.batch_size
    return (
        make_loader(ds, eval_batch, shuffle=False, workers=recipe.data.workers, seed=recipe.seed),
        eval_limit,
        eval_batch,
    )


def _backend_options(
    recipe: Recipe,
    out_dir: Path,
    input_size: int,
    num_classes: int,
    eval_batch: int,
    overrides: Optional[dict[str, Any]],
):
    from gslim.runtime import BackendOptions

    cfg = recipe.profile
    options = BackendOptions(
        threads=cfg.threads,
        fp16=cfg.fp16,
        cache_dir=out_dir / "trt_cache",
        input_size=input_size,
        num_classes=num_classes,
        max_batch=max([*cfg.batch_sizes, eval_batch]),
        opt_batch=max(cfg.batch_sizes),
        seed=recipe.seed,
        fit_batches=True,
    )
    if overrides:
        try:
            options = dataclasses.replace(options, **overrides)
        except TypeError as exc:
            raise GslimError(f"profile: bad backend option: {exc}") from exc
    return options


def _compact(r: dict[str, Any], accuracy: list[dict[str, Any]]) -> dict[str, Any]:
    top1 = next(
        (a["top1"] for a in accuracy if a["backend"] == r["backend"] and a["label"] == r["label"]), None
    )
    out = {
        k: r.get(k)
        for k in (
            "backend",
            "batch",
            "label",
            "role",
            "status",
            "reason",
            "precision",
            "speedup",
            "speedup_e2e",
            "noisy",
        )
    }
    lat = r.get("latency_ms") or {}
    out.update(
        median_ms=lat.get("median_ms"),
        p90_ms=lat.get("p90_ms"),
        p99_ms=lat.get("p99_ms"),
        cv=lat.get("cv"),
        throughput=lat.get("throughput"),
        e2e_median_ms=(r.get("e2e_ms") or {}).get("median_ms"),
        top1=top1,
    )
    return out
