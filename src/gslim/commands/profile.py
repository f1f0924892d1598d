"""``gslim profile``: the profile stage (:mod:`gslim.profiling.stage`) from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from gslim.commands.common import ForceOpt, SetOpt, recipe_from_cli
from gslim.errors import GslimError
from gslim.profiling.artifacts import group_artifacts
from gslim.profiling.stage import profile_stage


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gslim.profiling.report import fmt_ms, fmt_pct

    console = Console() if sys.stdout.isatty() else Console(width=150)
    ok = [r for r in summary["results"] if r["status"] == "ok"]
    if ok:
        table = Table(title="gslim profile", show_lines=False)
        for col, just in (
            ("backend", "left"),
            ("batch", "right"),
            ("artifact", "left"),
            ("role", "left"),
            ("prec", "left"),
            ("median ms", "right"),
            ("p90 ms", "right"),
            ("p99 ms", "right"),
            ("CV", "right"),
            ("img/s", "right"),
            ("speedup", "right"),
            ("top-1", "right"),
        ):
            table.add_column(col, justify=just)
        for r in ok:
            table.add_row(
                r["backend"],
                str(r["batch"]),
                r["label"],
                r["role"],
                str(r.get("precision") or ""),
                fmt_ms(r["median_ms"]),
                fmt_ms(r["p90_ms"]),
                fmt_ms(r["p99_ms"]),
                f"{r['cv']:.3f}" + (" ⚠" if r.get("noisy") else ""),
                f"{r['throughput']:.1f}",
                "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×",
                fmt_pct(r.get("top1")),
            )
        console.print(table)
    seen = set()
    for r in summary["results"]:
        if r["status"] != "ok" and (r["backend"], r["reason"]) not in seen:
            seen.add((r["backend"], r["reason"]))
            console.print(
                f"{r['status']}: {r['backend']}: {r['reason']}", highlight=False, markup=False, soft_wrap=True
            )
    for key in ("report_md", "report_json", "latency", "plot"):
        console.print(f"wrote {summary['paths'][key]}", highlight=False, markup=False, soft_wrap=True)


def profile_cmd(
    artifacts: list[Path] = typer.Argument(
        ...,
        help="Model files: gslim checkpoints (.pt), ONNX files (.onnx), TensorRT engines (.engine). "
        "Files with the same name stem in the same directory are one model (runs/x/base.pt + "
        "runs/x/base.onnx). The first model is the base unless --base says otherwise.",
        show_default=False,
    ),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", "-r", help="Recipe YAML whose profile/data sections to use (default: built-in)."
    ),
    sets: Optional[list[str]] = SetOpt,
    backend: Optional[list[str]] = typer.Option(
        None,
        "--backend",
        "-b",
        help="Backend to measure (repeatable): torch-cpu, torch-cuda, ort-cpu, "
        "ort-cuda, ort-trt, trt. Default: the recipe's profile.backends (torch-cpu, ort-cpu).",
    ),
    batch: Optional[list[int]] = typer.Option(
        None, "--batch", help="Batch size to time (repeatable). Default: profile.batch_sizes (1)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch-cpu and ort-cpu (default: profile.threads, 1)."
    ),
    warmup_s: Optional[float] = typer.Option(
        None, "--warmup-s", help="Warm-up seconds per model before timing (default: profile.warmup_s, 1.0)."
    ),
    min_iters: Optional[int] = typer.Option(
        None, "--min-iters", help="Minimum timed iterations per model (default: profile.min_iters, 50)."
    ),
    min_seconds: Optional[float] = typer.Option(
        None, "--min-seconds", help="Minimum timed seconds per model (default: profile.min_seconds, 2.0)."
    ),
    rounds: Optional[int] = typer.Option(
        None,
        "--rounds",
        help="Interleaved rounds: base and compressed alternate (default: profile.rounds, 5).",
    ),
    fp16: Optional[bool] = typer.Option(
        None, "--fp16/--fp32", help="Half precision on torch-cuda and ort-trt (default: profile.fp16, off)."
    ),
    eval_images: Optional[int] = typer.Option(
        None,
        "--eval-images",
        help="Validation images scored per artifact and backend "
        "(default: profile.eval_images, else data.val_images, else the whole split; 0: latency only). "
        "Top-1 is measured only when --recipe (or --set data.*) names the data.",
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", "-o", help="Where to write the report (default: the base model's directory)."
    ),
    force: bool = ForceOpt,
    base: Optional[str] = typer.Option(
        None, "--base", help="Which model is the base: its label (file stem) or its 0-based index."
    ),
    cuda_graphs: Optional[bool] = typer.Option(
        None,
        "--cuda-graphs/--no-cuda-graphs",
        help="CUDA graphs for torch-cuda and trt "
        "(default: on for trt where capture works, off for torch-cuda).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Measure latency (base vs compressed, interleaved) and top-1; write report.md/json, tradeoff.png."""
    from gslim.runtime import BACKENDS

    for name in backend or []:
        if name not in BACKENDS:
            raise GslimError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    r = recipe_from_cli(
        recipe,
        sets,
        profile__backends=list(backend) if backend else None,
        profile__batch_sizes=list(batch) if batch else None,
        profile__threads=threads,
        profile__warmup_s=warmup_s,
        profile__min_iters=min_iters,
        profile__min_seconds=min_seconds,
        profile__rounds=rounds,
        profile__fp16=fp16,
        profile__eval_images=eval_images,
    )
    sets_ = group_artifacts(list(artifacts), base)
    base_set = sets_[0]
    target = out_dir if out_dir is not None else next(iter(base_set.files().values())).parent
    opts = {"cuda_graphs": cuda_graphs} if cuda_graphs is not None else None
    # top-1 needs labelled data that the user named: the built-in default is not this model's data
    names_data = recipe is not None or any(x.split("=", 1)[0].strip().startswith("data.") for x in sets or [])
    summary = profile_stage(
        sets_, r, target, force=force, progress=not quiet, backend_options=opts, accuracy=names_data
    )
    _print_summary(summary)
    if summary["measured"] == 0:
        raise GslimError(
            f"nothing was measured: every backend was skipped or failed "
            f"(reasons in {summary['paths']['report_md']})"
        )


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
