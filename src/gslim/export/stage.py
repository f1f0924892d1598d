"""The export stage: checkpoint → ONNX (+ FP16 ONNX, + Q/DQ INT8 ONNX, + TensorRT engine) with
proven parity, callable from Python:

    from gslim.export.stage import export_stage
    export_stage("runs/demo/finetuned.pt", recipe, "runs/demo/export/main")

Every artifact is produced in one :class:`gslim.artifacts.Transaction`: private staging
directories next to the destinations, checked for parity, and only then published, all
together at the end. A failed or interrupted export leaves no file that looks complete.
``parity.json`` records the last attempt either way (``passed`` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gslim.artifacts import Transaction, check_output_dir, refuse_overwrite
from gslim.environment import environment_info
from gslim.errors import GslimError
from gslim.progress import Display
from gslim.recipe import Recipe

ONNX_NAME = "model.onnx"
FP16_NAME = "model.fp16.onnx"
INT8_NAME = "model.int8.onnx"
ENGINE_NAME = "model.engine"
PARITY_NAME = "parity.json"
PARTS = ("onnx", "onnx_fp16", "onnx_int8", "engine")


@dataclass
class _Outputs:
    """Where each requested artifact goes (None: not requested)."""

    onnx: Path
    fp16: Optional[Path]
    int8: Optional[Path]
    engine: Optional[Path]
    parity: Path

    def files(self) -> list[Path]:
        return [p for p in (self.onnx, self.fp16, self.int8, self.engine) if p is not None]


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
    ``model.int8.onnx`` when ``export.int8``, + ``model.engine`` when ``export.engine``) and
    ``out_dir/parity.json``; the explicit paths override those names. ``match_recipe_model``
    refuses a gslim checkpoint whose architecture or number of classes differs from the recipe's
    ``model`` section (the CLI sets it when the user names a recipe). Raises :class:`GslimError`
    (one line) when an output exists without ``force``, when TensorRT is asked for but missing,
    or when parity fails.
    """
    from gslim.artifacts import save_json

    out = _plan_outputs(recipe, Path(out_dir), onnx_path, fp16_path, int8_path, engine_path)
    _check_before_work(recipe, out, force, static_batch_size)
    cfg = recipe.export
    ui = Display(
        progress, steps=3 + (out.fp16 is not None) + (out.int8 is not None) + 2 * (out.engine is not None)
    )
    with ui.step(f"loading {checkpoint}"):
        model, spec = _load(checkpoint, recipe, match_recipe_model)
    with ui.step(f"reading parity images ({recipe.data.kind}, val split)"):
        images = parity_images(recipe, spec.input_size, spec.num_classes, cfg.parity_images)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "compressed": bool(spec.widths),
        "data": {"kind": recipe.data.kind, "split": "val", "images": int(images.shape[0])},
        "passed": False,
    }
    try:
        with Transaction() as tx:
            tmp_onnx = tx.stage(out.onnx)
            report["onnx"] = _export_fp32(
                recipe, model, spec, images, tmp_onnx, out.onnx, static_batch_size, ui
            )
            _check(report["onnx"])
            tmp_fp16 = tmp_int8 = None
            if out.fp16 is not None:
                tmp_fp16 = tx.stage(out.fp16)
                report["onnx_fp16"] = _export_fp16(recipe, model, images, tmp_onnx, tmp_fp16, out.fp16, ui)
                _check(report["onnx_fp16"])
            if out.int8 is not None:
                tmp_int8 = tx.stage(out.int8)
                report["onnx_int8"] = _export_int8(recipe, model, spec, tmp_onnx, tmp_int8, out.int8, ui)
                _check(report["onnx_int8"])
            if out.engine is not None:
                report["engine"] = _export_engine(
                    recipe,
                    images,
                    tmp_onnx,
                    tmp_fp16,
                    tmp_int8,
                    tx.stage(out.engine),
                    out.engine,
                    static_batch_size,
                    timing_cache,
                    ui,
                )
                _check(report["engine"])
            report["passed"] = True
            report["environment"] = environment_info()
            tx.commit()  # every check passed: publish everything
        save_json(report, out.parity)
    except GslimError as exc:
        if "onnx" in report:  # record the failed attempt; its artifacts are not kept
            report["error"] = str(exc)
            report["environment"] = environment_info()
            save_json(report, out.parity)
        raise
    summary: dict[str, Any] = {
        "onnx": str(out.onnx),
        "onnx_fp16": str(out.fp16) if out.fp16 else None,
        "onnx_int8": str(out.int8) if out.int8 else None,
        "engine": str(out.engine) if out.engine else None,
        "parity": str(out.parity),
        "passed": True,
        "results": {k: report[k] for k in PARTS if k in report},
    }
    _print_results(ui, summary)
    return summary


def _plan_outputs(recipe: Recipe, out_dir: Path, onnx_path, fp16_path, int8_path, engine_path) -> _Outputs:
    cfg = recipe.export
    fp16 = (Path(fp16_path) if fp16_path else out_dir / FP16_NAME) if (cfg.fp16_onnx or fp16_path) else None
    engine = (
        (Path(engine_path) if engine_path else out_dir / ENGINE_NAME) if (cfg.engine or engine_path) else None
    )
    # an INT8 engine is built from the Q/DQ ONNX, so asking for one makes the Q/DQ ONNX too
    wants_int8 = cfg.int8 or int8_path is not None or (engine is not None and cfg.precision == "int8")
    int8 = (Path(int8_path) if int8_path else out_dir / INT8_NAME) if wants_int8 else None
    return _Outputs(
        Path(onnx_path) if onnx_path else out_dir / ONNX_NAME, fp16, int8, engine, out_dir / PARITY_NAME
    )


def _check_before_work(recipe: Recipe, out: _Outputs, force: bool, static_batch_size: int) -> None:
    """Every refusal that can be known before loading, reading data and exporting."""
    cfg = recipe.export
    if not cfg.dynamic_batch and static_batch_size < 1:
        raise GslimError(f"the static batch must be >= 1, got {static_batch_size}")
    files = out.files()
    if len({p.resolve() for p in files}) != len(files):
        raise GslimError("the ONNX, FP16 ONNX, INT8 ONNX and engine outputs must be different files")
    for directory in dict.fromkeys(p.parent for p in [*files, out.parity]):
        check_output_dir(directory)
    for path, what in (
        (out.onnx, "ONNX export"),
        (out.fp16, "FP16 ONNX export"),
        (out.int8, "INT8 ONNX export"),
        (out.engine, "TensorRT engine"),
    ):
        if path is not None:
            refuse_overwrite(path, force, what)
    if out.engine is not None:
        from gslim.export.tensorrt import require_engine_support

        require_engine_support()  # fail now, before minutes of export work
        if not cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
            raise GslimError(
                f"export.min_batch <= opt_batch <= max_batch is required, got "
                f"{cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch}"
            )


def _export_fp32(
    recipe: Recipe, model, spec, images, tmp: Path, final: Path, static_batch_size: int, ui: Display
) -> dict:
    from gslim.export.onnx import export_onnx, exporter_for, onnx_opset
    from gslim.export.parity import onnx_parity

    cfg = recipe.export
    exporter = exporter_for(cfg.opset)
    batch_kind = "dynamic" if cfg.dynamic_batch else f"static {static_batch_size}"
    with ui.step(
        f"exporting ONNX ({exporter} exporter, opset {cfg.opset or 'default'}, {batch_kind} batch) "
        "and checking parity"
    ):
        # the transaction stages the file already: no second staging inside export_onnx
        export_onnx(
            model,
            spec.input_size,
            tmp,
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            batch=static_batch_size,
            atomic=False,
        )
        parity = onnx_parity(model, tmp, images, tolerance=cfg.tolerance, raise_on_fail=False)
    return {
        **parity,
        "path": str(final),
        "exporter": exporter,
        "opset": onnx_opset(tmp),
        "dynamic_batch": cfg.dynamic_batch,
        "static_batch": None if cfg.dynamic_batch else static_batch_size,
        "bytes": tmp.stat().st_size,
    }


def _export_fp16(recipe: Recipe, model, images, fp32_onnx: Path, tmp: Path, final: Path, ui: Display) -> dict:
    from gslim.export.onnx import convert_fp16
    from gslim.export.parity import onnx_parity

    with ui.step("converting to FP16 ONNX (FP32 inputs/outputs) and checking parity"):
        convert_fp16(fp32_onnx, tmp)
        p16 = onnx_parity(
            model, tmp, images, tolerance=recipe.export.fp16_tolerance, raise_on_fail=False, label="FP16 ONNX"
        )
    return {**p16, "path": str(final), "bytes": tmp.stat().st_size}


def _export_int8(
    recipe: Recipe, model, spec, fp32_onnx: Path, tmp_int8: Path, final: Path, ui: Display
) -> dict:
    """Quantize the FP32 ONNX to Q/DQ INT8 on the calibration images and gate its accuracy."""
    from gslim.export.int8 import int8_accuracy, quantize_int8

    cfg = recipe.export
    calib_n = cfg.int8_calib_images or recipe.data.calib_images
    with ui.step(f"quantizing to INT8 (Q/DQ, {cfg.int8_calibration} calibration on {calib_n} images)"):
        calib, _ = _calibration(recipe, spec.input_size, spec.num_classes, calib_n)
        info = quantize_int8(fp32_onnx, tmp_int8, calib, method=cfg.int8_calibration)
    with ui.step(
        f"scoring the INT8 ONNX against FP32 PyTorch ({cfg.int8_eval_images} labelled validation images)"
    ):
        images, labels = validation_batch(recipe, spec.input_size, spec.num_classes, cfg.int8_eval_images)
        acc = int8_accuracy(model, tmp_int8, images, labels, max_top1_drop=cfg.int8_max_top1_drop)
    return {**acc, "path": str(final), "quantization": info, "bytes": tmp_int8.stat().st_size}


def _export_engine(
    recipe: Recipe,
    images,
    tmp_onnx: Path,
    tmp_fp16: Optional[Path],
    tmp_int8: Optional[Path],
    tmp_engine: Path,
    final: Path,
    static_batch_size: int,
    timing_cache: Optional[Path],
    ui: Display,
) -> dict:
    from gslim.export.tensorrt import build_engine, engine_parity

    cfg = recipe.export
    lo, opt, hi = (
        (static_batch_size,) * 3 if not cfg.dynamic_batch else (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
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
    return {**pe, "path": str(final), "build": {**built, "path": str(final)}}


def _calibration(recipe: Recipe, input_size: int, num_classes: int, count: int):
    from gslim.data import calibration_batch

    return calibration_batch(recipe.data, input_size, num_classes, seed=recipe.seed, count=count)


def _check(part: dict) -> None:
    if not part["passed"]:
        raise GslimError(part["error"])


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


def _print_results(ui: Display, summary: dict) -> None:
    for key in PARTS:
        r = summary["results"].get(key)
        if r and key == "onnx_int8":
            ui.print(
                f"  {r['path']}: top-1 {r['int8_top1']:.2f}% vs FP32 {r['fp32_top1']:.2f}% "
                f"(drop {r['top1_drop']:.2f} <= {r['max_top1_drop']}), agreement {r['top1_agreement']:.1%} "
                f"on {r['images']} images"
            )
        elif r:
            gate = f"<= {r['effective_limit']:.1e}" if r.get("effective_limit") is not None else "n/a"
            ui.print(
                f"  {r['path']}: max diff {r['max_abs_diff']:.2e} ({gate}), "
                f"top-1 agreement {r['top1_agreement']:.1%} on {r['images']} images"
            )
    ui.print(f"  parity report: {summary['parity']}")
