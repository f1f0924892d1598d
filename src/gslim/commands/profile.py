"""The 'profile' stage: latency (interleaved, per backend and batch), accuracy, report and plot.

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
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from gslim.commands.common import ForceOpt, SetOpt, environment_info, recipe_from_cli
from gslim.errors import GslimError
from gslim.profiling import ROLES, ArtifactSet
from gslim.recipe import Recipe, recipe_to_dict

OUTPUT_NAMES = {
    "latency": "latency.json",
    "report_json": "report.json",
    "report_md": "report.md",
    "plot": "tradeoff.png",
}
KIND_BY_SUFFIX = {".pt": "pt", ".pth": "pt", ".onnx": "onnx", ".engine": "engine", ".plan": "engine",
                  ".trt": "engine"}

__all__ = ["ArtifactSet", "profile_stage", "group_artifacts", "register"]


# ----------------------------------------------------------------------------- artifacts


def group_artifacts(paths: list[Path], base: Optional[str] = None) -> list[ArtifactSet]:
    """Files → ArtifactSets: same directory + same stem = one model; the base comes first.

    ``base`` is a label (the stem, or ``dir/stem`` when stems collide) or a 0-based index into
    the groups in command-line order; by default the first group is the base.
    """
    if not paths:
        raise GslimError("give at least one artifact (.pt, .onnx or .engine)")
    groups: dict[tuple[Path, str], dict[str, Path]] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise GslimError(f"artifact not found: {p}")
        if not p.is_file():
            raise GslimError(f"artifact is not a file: {p}")
        kind = KIND_BY_SUFFIX.get(p.suffix.lower())
        if kind is None:
            raise GslimError(f"unsupported artifact {p.name}: give gslim checkpoints (.pt), "
                             "ONNX files (.onnx) or TensorRT engines (.engine)")
        key = (p.resolve().parent, p.stem)
        files = groups.setdefault(key, {})
        if kind in files and files[kind].resolve() != p.resolve():
            raise GslimError(f"two {kind} files for the model {p.stem!r} in {p.parent}: "
                             f"{files[kind]} and {p}")
        files[kind] = p
    stems = [stem for _, stem in groups]
    sets = []
    for (parent, stem), files in groups.items():
        label = stem if stems.count(stem) == 1 else f"{parent.name}/{stem}"
        sets.append(ArtifactSet(label=label, role="compressed", checkpoint=files.get("pt"),
                                onnx=files.get("onnx"), engine=files.get("engine")))
    labels = [s.label for s in sets]
    if len(set(labels)) != len(labels):
        raise GslimError(f"artifact labels collide ({', '.join(labels)}); rename the files")
    idx = 0
    if base is not None:
        if base in labels:
            idx = labels.index(base)
        elif base.strip().isdigit() and int(base) < len(sets):
            idx = int(base)
        else:
            raise GslimError(f"--base {base!r} names no artifact; choose one of {', '.join(labels)} "
                             f"or an index 0..{len(sets) - 1}")
    sets[idx].role = "base"
    return [sets[idx]] + [s for i, s in enumerate(sets) if i != idx]


def _onnx_shape_hints(path: Path) -> tuple[Optional[int], Optional[int]]:
    """(input size, classes) from an ONNX file's static dims, where it has them."""
    import onnx

    from gslim.profiling.backends import onnx_io_info

    info = onnx_io_info(path)
    dims = info["dims"]
    size = dims[2] if len(dims) == 4 and isinstance(dims[2], int) and dims[2] > 0 else None
    model = onnx.load(str(path), load_external_data=False)
    classes = None
    out = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    if len(out) == 2 and out[1].HasField("dim_value"):
        classes = out[1].dim_value
    return size, classes


def _describe_artifact(a: ArtifactSet) -> dict[str, Any]:
    """Files, sizes, arch, MACs and params (from the checkpoint, where there is one)."""
    from gslim.models import count_macs_params, load_model

    files = a.files()
    if not files:
        raise GslimError(f"artifact {a.label!r} has no files")
    for kind, p in files.items():
        if not p.is_file():
            raise GslimError(f"artifact {a.label!r}: {kind} file not found: {p}")
    info: dict[str, Any] = {
        "label": a.label, "role": a.role, "files": {k: str(p) for k, p in files.items()},
        "file_sizes": {k: p.stat().st_size for k, p in files.items()}, "extra": dict(a.extra),
        "arch": None, "macs": None, "params": None, "input_size": None, "num_classes": None,
        "widths": None,
    }
    if a.checkpoint is not None:
        model, spec = load_model(a.checkpoint)
        with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
            warnings.simplefilter("ignore", FutureWarning)
            macs, params = count_macs_params(model, spec.input_size)
        info.update(arch=spec.arch, macs=macs, params=params, input_size=spec.input_size,
                    num_classes=spec.num_classes, widths=spec.widths)
        del model
    elif a.onnx is not None:
        info["input_size"], info["num_classes"] = _onnx_shape_hints(Path(a.onnx))
    return info


def _common(infos: list[dict[str, Any]], key: str, fallback: int, what: str) -> int:
    values = {i["label"]: i[key] for i in infos if i[key] is not None}
    distinct = set(values.values())
    if len(distinct) > 1:
        pairs = ", ".join(f"{k}: {v}" for k, v in values.items())
        raise GslimError(f"the artifacts disagree on the {what} ({pairs}); "
                         "profile comparable models together")
    return distinct.pop() if distinct else fallback


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on stderr (or nothing), plus warnings that are always printed."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self._bar = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._bar is None:
            return lambda done: None
        tid = self._bar.add_task(description, total=total)
        bar = self._bar

        def update(done: int) -> None:
            bar.update(tid, completed=done)
            if done >= total:
                bar.remove_task(tid)

        return update

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def _why(exc: BaseException) -> str:
    """One line: a GslimError's message, or the type and first line of a runtime error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, GslimError) else f"{type(exc).__name__}: {first}"


class _Counter:
    """Accumulates per-batch counts into a progress callback."""

    def __init__(self, update: Callable[[int], None]):
        self.seen, self.update = 0, update

    def __call__(self, n: int) -> None:
        self.seen += n
        self.update(self.seen)


# ----------------------------------------------------------------------------- the stage


def _result(backend: str, a: ArtifactSet, batch: int, status: str, reason: Optional[str] = None,
            **more: Any) -> dict[str, Any]:
    return {"backend": backend, "batch": batch, "label": a.label, "role": a.role, "status": status,
            "reason": reason, **more}


def _profile_backend(
    name: str,
    artifacts: list[ArtifactSet],
    recipe: Recipe,
    options: Any,
    loader: Any,
    eval_limit: int,
    clock: Callable[[], float],
    ui: _Progress,
    warnings: list[str],
    versions: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from gslim.profiling.backends import ARTIFACT_SUFFIX, BackendUnavailable, BatchUnsupported, get_backend
    from gslim.profiling.measure import (
        CV_WARN,
        MeasureSettings,
        measure_interleaved,
        speedup,
        summarize,
        top1_accuracy,
    )

    cfg = recipe.profile
    cls = get_backend(name)
    results: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []

    def skip_all(a: ArtifactSet, status: str, reason: str) -> None:
        for b in cfg.batch_sizes:
            results.append(_result(name, a, b, status, reason))
        accuracy.append({"backend": name, "label": a.label, "top1": None, "images": 0, "reason": reason})

    ok, reason = cls.available()
    if not ok:
        for a in artifacts:
            skip_all(a, "skipped", reason)
        return results, accuracy

    with contextlib.ExitStack() as stack:
        active: dict[str, Any] = {}
        by_label = {a.label: a for a in artifacts}
        for a in artifacts:
            path = a.path_for(cls.artifact)
            if path is None:
                skip_all(a, "skipped", f"no {ARTIFACT_SUFFIX[cls.artifact]} file for {a.label!r}")
                continue
            opts = dataclasses.replace(options, precision_hint=a.extra.get("precision"))
            backend = cls(path, opts)
            try:
                stack.enter_context(backend)
            except BackendUnavailable as exc:
                skip_all(a, "skipped", str(exc).removeprefix(f"{name}: "))
                continue
            except (GslimError, RuntimeError) as exc:  # runtime errors: a bad artifact, out of memory
                msg = _why(exc).removeprefix(f"{name}: ")
                skip_all(a, "failed", msg)
                warnings.append(f"{name}: {a.label}: {msg}")
                ui.warn(f"{name}: {a.label}: {msg}")
                continue
            active[a.label] = backend

        # accuracy through this backend (also warms it up)
        for label, backend in active.items():
            total = min(eval_limit, len(loader.dataset))
            update = ui.task(f"{name} top-1 {label}", total)
            try:
                top1, n = top1_accuracy(backend.infer, loader, limit=eval_limit, on_batch=_Counter(update))
                accuracy.append({"backend": name, "label": label, "top1": top1, "images": n, "reason": None})
            except (GslimError, RuntimeError) as exc:
                update(total)
                accuracy.append({"backend": name, "label": label, "top1": None, "images": 0,
                                 "reason": _why(exc)})
                warnings.append(f"{name}: accuracy of {label}: {_why(exc)}")
                ui.warn(f"{name}: accuracy of {label}: {_why(exc)}")

        # latency, per batch, interleaved across artifacts
        settings = MeasureSettings.from_profile(cfg)
        for batch in cfg.batch_sizes:
            runners: dict[str, Any] = {}
            for label, backend in active.items():
                try:
                    backend.prepare(batch)
                    runners[label] = backend
                except BatchUnsupported as exc:
                    results.append(_result(name, by_label[label], batch, "skipped", str(exc)))
                except (GslimError, RuntimeError) as exc:
                    results.append(_result(name, by_label[label], batch, "failed", _why(exc)))
                    warnings.append(f"{name} b={batch}: {label}: {_why(exc)}")
                    ui.warn(f"{name} b={batch}: {label}: {_why(exc)}")
            if not runners:
                continue
            update = ui.task(f"{name} b={batch} rounds", settings.rounds)
            samples = measure_interleaved(runners, settings, clock=clock,
                                          on_round=lambda d, t, update=update: update(d))
            base_label = next((lb for lb in runners if by_label[lb].role == "base"), None)
            for label, smp in samples.items():
                a, backend = by_label[label], runners[label]
                lat = summarize(smp.primary, batch)
                e2e = summarize(smp.e2e, batch) if smp.e2e else None
                sp: dict[str, Any] = {"speedup": None, "speedup_round_min": None, "speedup_round_max": None,
                                      "speedup_rounds": 0, "speedup_e2e": None}
                if base_label is not None and label != base_label:
                    s = speedup(samples[base_label], smp)
                    sp = {"speedup": s["speedup"], "speedup_round_min": s["speedup_round_min"],
                          "speedup_round_max": s["speedup_round_max"], "speedup_rounds": s["rounds"],
                          "speedup_e2e": None}
                    if e2e is not None and samples[base_label].e2e:
                        sp["speedup_e2e"] = summarize(samples[base_label].e2e)["median_ms"] / e2e["median_ms"]
                desc = backend.describe()
                if lat["noisy"]:
                    msg = (f"{name} b={batch} {label}: CV {lat['cv']:.2f} > {CV_WARN:g} — noisy measurement; "
                           "raise --min-seconds or use a quieter machine")
                    warnings.append(msg)
                    ui.warn(msg)
                results.append(_result(
                    name, a, batch, "ok", None,
                    precision=desc["precision"], device=desc["device"], runtime=desc["runtime"],
                    versions=versions,
                    options=desc.get("options", {}), notes=desc["notes"], timing=desc["timing"],
                    latency_ms=lat, e2e_ms=e2e, throughput=lat["throughput"], noisy=lat["noisy"], **sp,
                    warmup={"iters": smp.warmup_iters, "seconds": smp.warmup_s}, timed_s=smp.timed_s,
                    samples_ms=[t * 1e3 for t in smp.primary],
                    e2e_samples_ms=[t * 1e3 for t in smp.e2e] if smp.e2e else None,
                    round_index=smp.round_index,
                ))
    return results, accuracy


def profile_stage(
    artifacts: list[ArtifactSet],
    recipe: Recipe,
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    backend_options: Optional[dict[str, Any]] = None,
    clock: Optional[Callable[[], float]] = None,
) -> dict[str, Any]:
    """Measure every backend × batch (base and compressed interleaved), score top-1, write the report.

    Writes ``out_dir/{latency.json, report.json, report.md, tradeoff.png}`` and returns a summary
    with their paths, the compact results and the warnings. ``backend_options`` overrides fields
    of :class:`gslim.profiling.backends.BackendOptions` (e.g. ``{"cuda_graphs": True}``);
    ``clock`` replaces ``time.perf_counter`` (tests).
    """
    from torch.utils.data import Subset

    from gslim import __version__
    from gslim.artifacts import refuse_overwrite
    from gslim.data import make_dataset, make_loader
    from gslim.profiling.backends import BackendOptions
    from gslim.profiling.measure import CV_WARN
    from gslim.profiling.report import REPORT_FORMAT, REPORT_VERSION, strip_samples, write_reports

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

    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in OUTPUT_NAMES.items()}
    refuse_overwrite(paths["report_json"], force, "profile report")
    refuse_overwrite(paths["latency"], force, "latency measurement")
    cfg = recipe.profile
    started = time.time()

    infos = [_describe_artifact(a) for a in artifacts]
    input_size = _common(infos, "input_size", recipe.model.input_size, "input size")
    num_classes = _common(infos, "num_classes", recipe.model.num_classes, "number of classes")

    # validation data, scored identically through every backend
    ds = make_dataset(recipe.data, "val", input_size, num_classes, recipe.seed)
    eval_limit = cfg.eval_images or recipe.data.val_images or len(ds)
    eval_limit = min(eval_limit, len(ds))
    ds = Subset(ds, range(eval_limit))
    eval_batch = recipe.data.eval_batch_size or recipe.data.batch_size
    loader = make_loader(ds, eval_batch, shuffle=False, workers=recipe.data.workers, seed=recipe.seed)

    options = BackendOptions(
        threads=cfg.threads, fp16=cfg.fp16, cache_dir=out_dir / "trt_cache", input_size=input_size,
        num_classes=num_classes, max_batch=max([*cfg.batch_sizes, eval_batch]),
        opt_batch=max(cfg.batch_sizes), seed=recipe.seed,
    )
    if backend_options:
        try:
            options = dataclasses.replace(options, **backend_options)
        except TypeError as exc:
            raise GslimError(f"profile: bad backend option: {exc}") from exc

    env = environment_info()
    if env.get("gpu"):
        from gslim.profiling.gpu_context import driver_version

        env["driver"] = driver_version()
    versions = {k: env.get(k) for k in ("python", "torch", "torchvision", "onnx", "onnxruntime", "tensorrt")}

    results: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    warnings: list[str] = []
    with _Progress(progress) as ui:
        for name in dict.fromkeys(cfg.backends):  # de-duplicated, in order
            r, acc = _profile_backend(name, artifacts, recipe, options, loader, eval_limit,
                                      clock or time.perf_counter, ui, warnings, versions)
            results += r
            accuracy += acc
    settings = {**cfg.model_dump(mode="json"), "cv_warn": CV_WARN, "eval_batch_size": eval_batch}
    common = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "gslim": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": env, "settings": settings, "eval_images": eval_limit,
        "data": recipe.data.kind, "input_size": input_size, "num_classes": num_classes,
        "artifacts": infos, "accuracy": accuracy, "warnings": warnings,
        "paths": {k: str(p) for k, p in paths.items()},
        "elapsed_s": None,
    }
    common["elapsed_s"] = round(time.time() - started, 2)
    latency = {**common, "results": results, "recipe": recipe_to_dict(recipe)}
    report = {**common, "results": strip_samples(results)}
    write_reports(report, latency, out_dir, paths)

    n_ok = sum(r["status"] == "ok" for r in results)
    return {
        "out_dir": str(out_dir),
        "paths": {k: str(p) for k, p in paths.items()},
        "measured": n_ok,
        "skipped": sum(r["status"] == "skipped" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "results": [_compact(r, accuracy) for r in results],
        "accuracy": accuracy,
        "warnings": warnings,
        "elapsed_s": common["elapsed_s"],
    }


def _compact(r: dict[str, Any], accuracy: list[dict[str, Any]]) -> dict[str, Any]:
    top1 = next((a["top1"] for a in accuracy
                 if a["backend"] == r["backend"] and a["label"] == r["label"]), None)
    out = {k: r.get(k) for k in ("backend", "batch", "label", "role", "status", "reason", "precision",
                                 "speedup", "speedup_e2e", "noisy")}
    lat = r.get("latency_ms") or {}
    out.update(median_ms=lat.get("median_ms"), p90_ms=lat.get("p90_ms"), p99_ms=lat.get("p99_ms"),
               cv=lat.get("cv"), throughput=lat.get("throughput"),
               e2e_median_ms=(r.get("e2e_ms") or {}).get("median_ms"), top1=top1)
    return out


# ----------------------------------------------------------------------------- CLI


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gslim.profiling.report import fmt_ms, fmt_pct

    console = Console() if sys.stdout.isatty() else Console(width=150)
    ok = [r for r in summary["results"] if r["status"] == "ok"]
    if ok:
        table = Table(title="gslim profile", show_lines=False)
        for col, just in (("backend", "left"), ("batch", "right"), ("artifact", "left"), ("role", "left"),
                          ("prec", "left"), ("median ms", "right"), ("p90 ms", "right"), ("p99 ms", "right"),
                          ("CV", "right"), ("img/s", "right"), ("speedup", "right"), ("top-1", "right")):
            table.add_column(col, justify=just)
        for r in ok:
            table.add_row(
                r["backend"], str(r["batch"]), r["label"], r["role"], str(r.get("precision") or ""),
                fmt_ms(r["median_ms"]), fmt_ms(r["p90_ms"]), fmt_ms(r["p99_ms"]),
                f"{r['cv']:.3f}" + (" ⚠" if r.get("noisy") else ""), f"{r['throughput']:.1f}",
                "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×", fmt_pct(r.get("top1")),
            )
        console.print(table)
    seen = set()
    for r in summary["results"]:
        if r["status"] != "ok" and (r["backend"], r["reason"]) not in seen:
            seen.add((r["backend"], r["reason"]))
            console.print(f"{r['status']}: {r['backend']}: {r['reason']}", highlight=False, markup=False,
                          soft_wrap=True)
    for key in ("report_md", "report_json", "latency", "plot"):
        console.print(f"wrote {summary['paths'][key]}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        artifacts: list[Path] = typer.Argument(
            ..., help="Model files: gslim checkpoints (.pt), ONNX files (.onnx), TensorRT engines (.engine). "
            "Files with the same name stem in the same directory are one model (runs/x/base.pt + "
            "runs/x/base.onnx). The first model is the base unless --base says otherwise.",
            show_default=False),
        recipe: Optional[Path] = typer.Option(
            None, "--recipe", "-r",
            help="Recipe YAML whose profile/data sections to use (default: built-in)."),
        sets: Optional[list[str]] = SetOpt,
        backend: Optional[list[str]] = typer.Option(
            None, "--backend", "-b", help="Backend to measure (repeatable): torch-cpu, torch-cuda, ort-cpu, "
            "ort-cuda, ort-trt, trt. Default: the recipe's profile.backends (torch-cpu, ort-cpu)."),
        batch: Optional[list[int]] = typer.Option(
            None, "--batch", help="Batch size to time (repeatable). Default: profile.batch_sizes (1)."),
        threads: Optional[int] = typer.Option(
            None, "--threads", help="CPU threads for torch-cpu and ort-cpu (default: profile.threads, 1)."),
        warmup_s: Optional[float] = typer.Option(
            None, "--warmup-s",
            help="Warm-up seconds per model before timing (default: profile.warmup_s, 1.0)."),
        min_iters: Optional[int] = typer.Option(
            None, "--min-iters", help="Minimum timed iterations per model (default: profile.min_iters, 50)."),
        min_seconds: Optional[float] = typer.Option(
            None, "--min-seconds",
            help="Minimum timed seconds per model (default: profile.min_seconds, 2.0)."),
        rounds: Optional[int] = typer.Option(
            None, "--rounds",
            help="Interleaved rounds: base and compressed alternate (default: profile.rounds, 5)."),
        fp16: Optional[bool] = typer.Option(
            None, "--fp16/--fp32",
            help="Half precision on torch-cuda and ort-trt (default: profile.fp16, off)."),
        eval_images: Optional[int] = typer.Option(
            None, "--eval-images", help="Validation images scored per artifact and backend "
            "(default: profile.eval_images, else data.val_images, else the whole split)."),
        out_dir: Optional[Path] = typer.Option(
            None, "--out-dir", "-o", help="Where to write the report (default: the base model's directory)."),
        force: bool = ForceOpt,
        base: Optional[str] = typer.Option(
            None, "--base", help="Which model is the base: its label (file stem) or its 0-based index."),
        cuda_graphs: Optional[bool] = typer.Option(
            None, "--cuda-graphs/--no-cuda-graphs",
            help="CUDA graphs for torch-cuda and trt "
            "(default: on for trt where capture works, off for torch-cuda)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Measure latency (base vs compressed, interleaved) and top-1; write report.md/json, tradeoff.png."""
        from gslim.profiling.backends import BACKENDS

        for name in backend or []:
            if name not in BACKENDS:
                raise GslimError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        r = recipe_from_cli(
            recipe, sets,
            profile__backends=list(backend) if backend else None,
            profile__batch_sizes=list(batch) if batch else None,
            profile__threads=threads, profile__warmup_s=warmup_s, profile__min_iters=min_iters,
            profile__min_seconds=min_seconds, profile__rounds=rounds, profile__fp16=fp16,
            profile__eval_images=eval_images,
        )
        sets_ = group_artifacts(list(artifacts), base)
        base_set = sets_[0]
        target = out_dir if out_dir is not None else next(iter(base_set.files().values())).parent
        opts = {"cuda_graphs": cuda_graphs} if cuda_graphs is not None else None
        summary = profile_stage(sets_, r, target, force=force, progress=not quiet, backend_options=opts)
        _print_summary(summary)
        if summary["measured"] == 0:
            raise GslimError(f"nothing was measured: every backend was skipped or failed "
                             f"(reasons in {summary['paths']['report_md']})")
