"""The export stage: checkpoint → ONNX (+ FP16 ONNX, + TensorRT engine) with proven parity.

Every artifact is produced in a private staging directory next to its destination, checked
for parity, and only then renamed into place, all together at the end: a failed or
interrupted export leaves no file that looks complete. ``parity.json`` records the last
attempt either way (``passed`` says which).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from gslim.artifacts import check_output_dir, refuse_overwrite
from gslim.commands.common import ForceOpt, SetOpt, environment_info, recipe_from_cli
from gslim.errors import GslimError
from gslim.recipe import Recipe

ONNX_NAME = "model.onnx"
FP16_NAME = "model.fp16.onnx"
INT8_NAME = "model.int8.onnx"
ENGINE_NAME = "model.engine"
PARITY_NAME = "parity.json"


def export_stage(
    checkpoint: Path,
    recipe: Recipe,
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    onnx_path: Optional[Path] = None,
    fp16_path: Optional[Path] = None,
    engine_path: Optional[Path] = None,
    int8_path: Optional[Path] = None,
    static_batch_size: int = 1,
    timing_cache: Optional[Path] = None,
    match_recipe_model: bool = False,
) -> dict:
    """Export ``checkpoint`` as the recipe's ``export`` section says; return a summary with the paths.

    Writes ``out_dir/model.onnx`` (+ ``model.fp16.onnx`` when ``export.fp16_onnx``, +
    ``model.engine`` when ``export.engine``) and ``out_dir/parity.json``; the explicit paths
    override those names. ``match_recipe_model`` refuses a gslim checkpoint whose architecture or
    number of classes differs from the recipe's ``model`` section (the CLI sets it when the user
    names a recipe). Raises :class:`GslimError` (one line) when an output exists
    without ``force``, when TensorRT is asked for but missing, or when parity fails.
    """
    cfg = recipe.export
    out_dir = Path(out_dir)
    onnx_out = Path(onnx_path) if onnx_path else out_dir / ONNX_NAME
    fp16_out = (
        (Path(fp16_path) if fp16_path else out_dir / FP16_NAME) if (cfg.fp16_onnx or fp16_path) else None
    )
    engine_out = (
        (Path(engine_path) if engine_path else out_dir / ENGINE_NAME) if (cfg.engine or engine_path) else None
    )
    # an INT8 engine is built from the Q/DQ ONNX, so asking for one makes the Q/DQ ONNX too
    wants_int8 = cfg.int8 or int8_path is not None or (engine_out is not None and cfg.precision == "int8")
    int8_out = (Path(int8_path) if int8_path else out_dir / INT8_NAME) if wants_int8 else None
    parity_out = out_dir / PARITY_NAME
    if not cfg.dynamic_batch and static_batch_size < 1:
        raise GslimError(f"the static batch must be >= 1, got {static_batch_size}")
    outputs = [p for p in (onnx_out, fp16_out, int8_out, engine_out) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise GslimError("the ONNX, FP16 ONNX, INT8 ONNX and engine outputs must be different files")
    for directory in dict.fromkeys(p.parent for p in [*outputs, parity_out]):
        check_output_dir(directory)  # before loading, reading data and exporting
    for path, what in (
        (onnx_out, "ONNX export"),
        (fp16_out, "FP16 ONNX export"),
        (int8_out, "INT8 ONNX export"),
        (engine_out, "TensorRT engine"),
    ):
        if path is not None:
            refuse_overwrite(path, force, what)
    if engine_out is not None:
        from gslim.export.tensorrt import require_engine_support

        require_engine_support()  # fail now, before minutes of export work
        if not cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
            raise GslimError(
                f"export.min_batch <= opt_batch <= max_batch is required, got "
                f"{cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch}"
            )

    from gslim.artifacts import save_json
    from gslim.export.onnx import convert_fp16, export_onnx, exporter_for, onnx_opset
    from gslim.export.parity import onnx_parity

    steps = 3 + (fp16_out is not None) + (int8_out is not None) + 2 * (engine_out is not None)
    ui = _Steps(progress, steps)
    with ui.step(f"loading {checkpoint}"):
        model, spec = _load(checkpoint, recipe, match_recipe_model)
    size = spec.input_size
    with ui.step(f"reading parity images ({recipe.data.kind}, val split)"):
        images = parity_images(recipe, size, spec.num_classes, cfg.parity_images)

    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "input_size": size,
        "compressed": bool(spec.widths),
        "data": {"kind": recipe.data.kind, "split": "val", "images": int(images.shape[0])},
        "passed": False,
    }
    summary: dict[str, Any] = {"onnx": None, "onnx_fp16": None, "onnx_int8": None, "engine": None,
                               "parity": str(parity_out)}
    staged: list[tuple[Path, Path]] = []  # (private staging directory, final path)
    try:
        tmp_onnx = _stage(onnx_out, staged)
        exporter = exporter_for(cfg.opset)
        batch_kind = "dynamic" if cfg.dynamic_batch else f"static {static_batch_size}"
        with ui.step(
            f"exporting ONNX ({exporter} exporter, opset {cfg.opset or 'default'}, {batch_kind} batch) "
            f"and checking parity"
        ):
            export_onnx(
                model,
                size,
                tmp_onnx,
                opset=cfg.opset,
                dynamic_batch=cfg.dynamic_batch,
                batch=static_batch_size,
            )
            parity = onnx_parity(model, tmp_onnx, images, tolerance=cfg.tolerance, raise_on_fail=False)
        report["onnx"] = {
            **parity,
            "path": str(onnx_out),
            "exporter": exporter,
            "opset": onnx_opset(tmp_onnx),
            "dynamic_batch": cfg.dynamic_batch,
            "static_batch": None if cfg.dynamic_batch else static_batch_size,
            "bytes": tmp_onnx.stat().st_size,
        }
        _check(report["onnx"])

        tmp_fp16 = None
        if fp16_out is not None:
            tmp_fp16 = _stage(fp16_out, staged)
            with ui.step("converting to FP16 ONNX (FP32 inputs/outputs) and checking parity"):
                convert_fp16(tmp_onnx, tmp_fp16)
                p16 = onnx_parity(
                    model,
                    tmp_fp16,
                    images,
                    tolerance=cfg.fp16_tolerance,
                    raise_on_fail=False,
                    label="FP16 ONNX",
                )
            report["onnx_fp16"] = {**p16, "path": str(fp16_out), "bytes": tmp_fp16.stat().st_size}
            _check(report["onnx_fp16"])

        tmp_int8 = None
        if int8_out is not None:
            tmp_int8 = _stage(int8_out, staged)
            report["onnx_int8"] = _export_int8(recipe, model, spec, tmp_onnx, tmp_int8, int8_out, ui)
            _check(report["onnx_int8"])

        if engine_out is not None:
            from gslim.export.tensorrt import build_engine, engine_parity

            tmp_engine = _stage(engine_out, staged)
            static = not cfg.dynamic_batch
            lo, opt, hi = (
                (static_batch_size,) * 3 if static else (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
            )
            with ui.step(f"building the TensorRT {cfg.precision.upper()} engine (batch {lo}/{opt}/{hi})"):
                built = build_engine(
                    tmp_onnx,
                    tmp_engine,
                    precision=cfg.precision,
                    min_batch=lo,
                    opt_batch=opt,
                    max_batch=hi,
                    workspace_mb=cfg.workspace_mb,
                    optimization_level=cfg.optimization_level,
                    timing_cache=timing_cache,
                    dla_core=cfg.dla_core,
                    fp16_onnx=tmp_fp16,
                    int8_onnx=tmp_int8,
                )
            with ui.step("checking engine parity against ONNX Runtime"):
                pe = engine_parity(
                    tmp_engine,
                    tmp_onnx,
                    images,
                    precision=cfg.precision,
                    tolerance=cfg.engine_tolerance,
                    raise_on_fail=False,
                    dla_core=cfg.dla_core,
                )
            report["engine"] = {**pe, "path": str(engine_out), "build": {**built, "path": str(engine_out)}}
            _check(report["engine"])

        report["passed"] = True
        report["environment"] = environment_info()
        for stage_dir, final in staged:  # every check passed: publish everything
            _publish(stage_dir, final)
        summary.update(
            onnx=str(onnx_out),
            onnx_fp16=str(fp16_out) if fp16_out else None,
            onnx_int8=str(int8_out) if int8_out else None,
            engine=str(engine_out) if engine_out else None,
        )
        save_json(report, parity_out)
    except GslimError as exc:
        if "onnx" in report:  # record the failed attempt; its artifacts are not kept
            report["error"] = str(exc)
            report["environment"] = environment_info()
            save_json(report, parity_out)
        raise
    finally:
        for stage_dir, _ in staged:
            shutil.rmtree(stage_dir, ignore_errors=True)
    summary["passed"] = True
    summary["results"] = {k: report[k] for k in ("onnx", "onnx_fp16", "onnx_int8", "engine") if k in report}
    ui.done(summary)
    return summary


def _export_int8(recipe: Recipe, model, spec, fp32_onnx: Path, tmp_int8: Path, final: Path, ui: "_Steps") -> dict:
    """Quantize the FP32 ONNX to Q/DQ INT8 on the calibration images and gate its accuracy."""
    from gslim.export.int8 import int8_accuracy, quantize_int8

    cfg = recipe.export
    calib_n = cfg.int8_calib_images or recipe.data.calib_images
    with ui.step(f"quantizing to INT8 (Q/DQ, {cfg.int8_calibration} calibration on {calib_n} images)"):
        calib, _ = _calibration(recipe, spec.input_size, spec.num_classes, calib_n)
        info = quantize_int8(fp32_onnx, tmp_int8, calib, method=cfg.int8_calibration)
    with ui.step(f"scoring the INT8 ONNX against FP32 PyTorch ({cfg.int8_eval_images} labelled validation images)"):
        images, labels = validation_batch(recipe, spec.input_size, spec.num_classes, cfg.int8_eval_images)
        acc = int8_accuracy(model, tmp_int8, images, labels, max_top1_drop=cfg.int8_max_top1_drop)
    return {**acc, "path": str(final), "quantization": info, "bytes": tmp_int8.stat().st_size}


def _calibration(recipe: Recipe, input_size: int, num_classes: int, count: int):
    from gslim.data import calibration_batch

    return calibration_batch(recipe.data, input_size, num_classes, seed=recipe.seed, count=count)


def _check(part: dict) -> None:
    if not part["passed"]:
        raise GslimError(part["error"])


def _stage(final: Path, staged: list[tuple[Path, Path]]) -> Path:
    """A private directory next to ``final`` (same filesystem: the final rename is atomic); returns
    the path to write, which has ``final``'s name so external-data references stay valid."""
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise GslimError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    staged.append((stage_dir, final))
    return stage_dir / final.name


def _publish(stage_dir: Path, final: Path) -> None:
    """Move side files (external data) first and the artifact itself last."""
    main = stage_dir / final.name
    try:
        for f in sorted(stage_dir.iterdir()):
            if f != main:
                os.replace(f, final.parent / f.name)
        os.replace(main, final)
    except OSError as exc:
        raise GslimError(f"could not write {final}: {exc.strerror or exc}") from exc


def _load(checkpoint: Path, recipe: Recipe, match_recipe_model: bool = False):
    """A gslim checkpoint knows its architecture; a bare state dict takes it from the recipe.

    With ``match_recipe_model`` a gslim checkpoint must also be the recipe's architecture and
    number of classes.
    """
    from gslim.models import load_model, read_checkpoint

    spec, _ = read_checkpoint(checkpoint)
    m = recipe.model
    if spec.arch and not match_recipe_model:
        return load_model(checkpoint)
    return load_model(checkpoint, expect_arch=m.arch, num_classes=m.num_classes, input_size=m.input_size)


def parity_images(recipe: Recipe, input_size: int, num_classes: int, count: int) -> "torch.Tensor":  # noqa: F821
    """The first ``count`` validation images (no augmentation), as one CPU tensor."""
    return validation_batch(recipe, input_size, num_classes, count)[0]


def validation_batch(recipe: Recipe, input_size: int, num_classes: int, count: int):
    """The first ``count`` validation images (no augmentation) and their labels, as CPU tensors."""
    import torch

    from gslim.data import eval_view, make_dataset, make_loader

    limit = count if recipe.data.val_images is None else min(count, recipe.data.val_images)
    cfg = recipe.data.model_copy(update={"val_images": limit})
    ds = eval_view(make_dataset(cfg, "val", input_size, num_classes, seed=recipe.seed))
    xs, ys, n = [], [], 0
    for x, y in make_loader(ds, batch_size=min(limit, 64), shuffle=False, workers=cfg.workers):
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= limit:
            break
    return torch.cat(xs)[:limit].float().contiguous(), torch.cat(ys)[:limit].long()


class _Steps:
    """Numbered progress lines on stderr, with a spinner while a step runs on a terminal."""

    def __init__(self, enabled: bool, total: int):
        self.total, self.i = total, 0
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.i += 1
        if self.console is None:
            yield
            return
        label = f"[{self.i}/{self.total}] {text}"
        start = time.perf_counter()
        with self.console.status(label):
            yield
        self.console.print(
            f"{label} [dim]({time.perf_counter() - start:.1f}s)[/dim]", highlight=False, soft_wrap=True
        )

    def done(self, summary: dict) -> None:
        if self.console is None:
            return
        for key in ("onnx", "onnx_fp16", "onnx_int8", "engine"):
            r = summary["results"].get(key)
            if r and key == "onnx_int8":
                self.console.print(
                    f"  {r['path']}: top-1 {r['int8_top1']:.2f}% vs FP32 {r['fp32_top1']:.2f}% "
                    f"(drop {r['top1_drop']:.2f} <= {r['max_top1_drop']}), agreement {r['top1_agreement']:.1%} "
                    f"on {r['images']} images",
                    highlight=False,
                    soft_wrap=True,
                )
            elif r:
                gate = f"<= {r['effective_limit']:.1e}" if r.get("effective_limit") is not None else "n/a"
                self.console.print(
                    f"  {r['path']}: max diff {r['max_abs_diff']:.2e} ({gate}), "
                    f"top-1 agreement {r['top1_agreement']:.1%} on {r['images']} images",
                    highlight=False,
                    soft_wrap=True,
                )
        self.console.print(f"  parity report: {summary['parity']}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    @app.command("export", no_args_is_help=True)
    def export_cmd(
        model: Path = typer.Argument(
            ..., help="gslim checkpoint (.pt) to export (base, compressed or fine-tuned)."
        ),
        recipe: Optional[Path] = typer.Option(
            None, "--recipe", "-r", help="Recipe YAML: its export section and the data used for parity."
        ),
        sets: Optional[list[str]] = SetOpt,
        out_dir: Optional[Path] = typer.Option(
            None,
            "--out-dir",
            "-o",
            help="Directory for model.onnx, parity.json and the other outputs "
            "(default: the directory of --onnx, else of MODEL).",
        ),
        onnx: Optional[Path] = typer.Option(
            None, "--onnx", help="ONNX output path (default: OUT_DIR/model.onnx)."
        ),
        fp16_onnx: Optional[Path] = typer.Option(
            None,
            "--fp16-onnx",
            help="Also write an FP16 ONNX (FP32 inputs/outputs) here (needs onnxconverter-common).",
        ),
        opset: Optional[int] = typer.Option(
            None,
            "--opset",
            help="ONNX opset (11-23). <=17 uses the TorchScript exporter, for old TensorRT "
            "(JetPack 5) (default: the dynamo exporter's default).",
        ),
        static_batch: bool = typer.Option(
            False,
            "--static-batch",
            help="Fix the batch size in the graph (see --batch) instead of a dynamic axis.",
        ),
        batch: int = typer.Option(1, "--batch", min=1, help="Batch size of a --static-batch export."),
        int8: bool = typer.Option(
            False,
            "--int8",
            help="Also write a Q/DQ INT8 ONNX (OUT_DIR/model.int8.onnx), calibrated on the recipe's calibration "
            "images, and fail when its top-1 drops more than --int8-max-drop points below FP32.",
        ),
        int8_calibration: Optional[str] = typer.Option(
            None, "--int8-calibration", help="INT8 activation ranges: minmax, entropy or percentile (default: minmax)."
        ),
        calib_images: Optional[int] = typer.Option(
            None, "--calib-images", min=1, help="Calibration images for INT8 (default: data.calib_images)."
        ),
        int8_max_drop: Optional[float] = typer.Option(
            None, "--int8-max-drop", min=0.0, help="Largest INT8 top-1 drop in points vs FP32 (default: 1.0)."
        ),
        engine: Optional[Path] = typer.Option(
            None, "--engine", help="Also build a TensorRT engine here (needs TensorRT and a CUDA GPU); "
            "--precision int8 builds it from the Q/DQ INT8 ONNX."
        ),
        precision: Optional[str] = typer.Option(
            None, "--precision", help="Engine precision: fp32, fp16 or int8 (default: recipe, fp16)."
        ),
        min_batch: Optional[int] = typer.Option(
            None, "--min-batch", min=1, help="Smallest batch the engine accepts."
        ),
        opt_batch: Optional[int] = typer.Option(
            None, "--opt-batch", min=1, help="Batch the engine is tuned for."
        ),
        max_batch: Optional[int] = typer.Option(
            None, "--max-batch", min=1, help="Largest batch the engine accepts."
        ),
        workspace_mb: Optional[int] = typer.Option(
            None, "--workspace-mb", min=16, help="TensorRT builder workspace limit in MiB (default: 2048)."
        ),
        opt_level: Optional[int] = typer.Option(
            None, "--opt-level", min=0, max=5, help="TensorRT builder optimization level 0-5 (default: 3)."
        ),
        timing_cache: Optional[Path] = typer.Option(
            None,
            "--timing-cache",
            help="TensorRT timing cache file, reused across builds and updated after each.",
        ),
        dla_core: Optional[int] = typer.Option(
            None,
            "--dla-core",
            min=0,
            help="Build for this DLA core (Jetson), with GPU fallback; fp16/int8 only.",
        ),
        tolerance: Optional[float] = typer.Option(
            None,
            "--tolerance",
            help="FP32 ONNX parity: max |ONNX Runtime - PyTorch| logit difference, times max(1, max|logit|) "
            "(default: 1e-4).",
        ),
        fp16_tolerance: Optional[float] = typer.Option(
            None,
            "--fp16-tolerance",
            help="FP16 ONNX tolerance, relative to max(1, max|logit|) (default: 1e-2).",
        ),
        engine_tolerance: Optional[float] = typer.Option(
            None,
            "--engine-tolerance",
            help="Engine vs ONNX Runtime tolerance, times max(1, max|logit|) "
            "(default: fp32 1e-3, fp16 2e-2; int8 gates top-1 agreement).",
        ),
        parity_images_n: Optional[int] = typer.Option(
            None,
            "--parity-images",
            min=1,
            help="Validation images compared in the parity checks (default: 256).",
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines; print only the result."),
        force: bool = ForceOpt,
    ) -> None:
        """Export a checkpoint to ONNX (and FP16 ONNX / a TensorRT engine) and prove parity on real images."""
        if precision is not None and precision not in ("fp32", "fp16", "int8"):
            raise GslimError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
        if int8_calibration is not None and int8_calibration not in ("minmax", "entropy", "percentile"):
            raise GslimError(f"--int8-calibration must be minmax, entropy or percentile, got {int8_calibration!r}")
        rec = recipe_from_cli(
            recipe,
            sets,
            export__opset=opset,
            export__dynamic_batch=False if static_batch else None,
            export__fp16_onnx=True if fp16_onnx else None,
            export__engine=True if engine else None,
            export__int8=True if int8 else None,
            export__int8_calibration=int8_calibration,
            export__int8_calib_images=calib_images,
            export__int8_max_top1_drop=int8_max_drop,
            export__precision=precision,
            export__min_batch=min_batch,
            export__opt_batch=opt_batch,
            export__max_batch=max_batch,
            export__workspace_mb=workspace_mb,
            export__optimization_level=opt_level,
            export__dla_core=dla_core,
            export__tolerance=tolerance,
            export__fp16_tolerance=fp16_tolerance,
            export__engine_tolerance=engine_tolerance,
            export__parity_images=parity_images_n,
        )
        target = out_dir or (onnx.parent if onnx else model.parent)
        summary = export_stage(
            model,
            rec,
            target,
            force=force,
            progress=not quiet,
            onnx_path=onnx,
            fp16_path=fp16_onnx,
            engine_path=engine,
            static_batch_size=batch,
            timing_cache=timing_cache,
            # a recipe that names the model must match the checkpoint (as gslim evaluate does)
            match_recipe_model=recipe is not None
            or any(s.split("=", 1)[0].strip().startswith("model.") for s in sets or []),
        )
        typer.echo(
            f"exported {summary['onnx']}"
            + "".join(f", {summary[k]}" for k in ("onnx_fp16", "onnx_int8", "engine") if summary.get(k))
            + f" (parity passed; report {summary['parity']})"
        )
