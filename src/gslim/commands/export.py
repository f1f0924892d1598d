"""``gslim export``: the export stage (:mod:`gslim.export.stage`) from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gslim.commands.common import ForceOpt, SetOpt, recipe_from_cli
from gslim.errors import GslimError
from gslim.export.stage import export_stage


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
        None,
        "--int8-calibration",
        help="INT8 activation ranges: minmax, entropy or percentile (default: minmax).",
    ),
    calib_images: Optional[int] = typer.Option(
        None, "--calib-images", min=1, help="Calibration images for INT8 (default: data.calib_images)."
    ),
    int8_max_drop: Optional[float] = typer.Option(
        None, "--int8-max-drop", min=0.0, help="Largest INT8 top-1 drop in points vs FP32 (default: 1.0)."
    ),
    engine: Optional[Path] = typer.Option(
        None,
        "--engine",
        help="Also build a TensorRT engine here (needs TensorRT and a CUDA GPU); "
        "--precision int8 builds it from the Q/DQ INT8 ONNX.",
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
        raise GslimError(
            f"--int8-calibration must be minmax, entropy or percentile, got {int8_calibration!r}"
        )
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


def register(app: typer.Typer) -> None:
    app.command("export", no_args_is_help=True)(export_cmd)
