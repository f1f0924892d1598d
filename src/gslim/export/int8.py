"""INT8 by explicit quantization: a Q/DQ ONNX calibrated on the recipe's images, scored on CPU.

TensorRT deprecated its implicit INT8 calibrators in 10.1 and removed them (with the
INT8/FP16 builder flags) in 11: INT8 comes from QuantizeLinear/DequantizeLinear pairs in the
ONNX. The same file runs in ONNX Runtime's CPU provider, so its accuracy is measured on any
machine before a GPU sees it, and TensorRT 10 (explicit quantization) and 11 (strongly typed)
build engines from it.

The form is the one TensorRT's explicit quantization accepts and fuses (TensorRT developer
guide, "Explicit Quantization" and "Q/DQ Layer-Placement Recommendations"):

* signed INT8 for weights and activations, symmetric, zero points 0 (TensorRT supports only
  zero-point 0);
* per-channel weight scales on the output-channel axis (axis 0 of Conv and of a Gemm with
  ``transB=1``, which is what torch exports), per-tensor activation scales;
* Q/DQ on the inputs of the weighted ops (Conv, Gemm, MatMul) only, not on their outputs:
  TensorRT then fuses Conv+BN+activation into one INT8 kernel. BatchNorm is folded into the
  convolutions first (``quant_pre_process``) so no BN sits between a DQ and its conv;
* biases stay FP32 (``QuantizeBias: False``): TensorRT takes float biases, and an INT32 bias
  DequantizeLinear is not what its Q/DQ fusions expect.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gslim.errors import GslimError
from gslim.export.onnx import first_line

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class _Images:
    """ONNX Runtime's CalibrationDataReader over a tensor of images, a batch at a time."""

    def __init__(self, images: torch.Tensor, input_name: str, batch: int):
        self.x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        self.name, self.batch, self.i = input_name, batch, 0

    def get_next(self) -> Optional[dict]:
        if self.i >= self.x.shape[0]:
            return None
        out = {self.name: self.x[self.i : self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(
    fp32_onnx: Path,
    out_path: Path,
    calib_images: torch.Tensor,
    *,
    method: str = "minmax",
    batch: int = 16,
) -> dict:
    """Write a Q/DQ INT8 ONNX of ``fp32_onnx`` to ``out_path``, calibrated on ``calib_images``.

    A static-batch file is calibrated at its own batch size (the last partial batch is
    dropped); a dynamic one in batches of ``batch``. Returns what was done (JSON-able).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise GslimError(f"INT8 calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if calib_images.ndim != 4 or calib_images.shape[0] < 1:
        raise GslimError("INT8 calibration needs a non-empty batch of calibration images (data.calib_images)")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    graph = onnx.load(str(fp32_onnx), load_external_data=False).graph
    input_name = graph.input[0].name
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    static = dim0.dim_value if dim0.HasField("dim_value") else None
    if static is not None:
        if static > calib_images.shape[0]:
            raise GslimError(
                f"the ONNX has a static batch of {static} but only {calib_images.shape[0]} calibration images "
                "were given: export with a dynamic batch, or calibrate on more images (--calib-images)"
            )
        usable = calib_images.shape[0] // static * static
        calib_images, batch = calib_images[:usable], static
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # shape inference + ONNX Runtime's basic graph optimizations (Conv+BN folding)
            quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - the pre-processor raises whatever onnx raises
            raise GslimError(f"INT8 pre-processing of {fp32_onnx.name} failed: {first_line(exc)}") from exc
        try:
            quantize_static(
                str(prepared),
                str(out_path),
                _Images(calib_images, input_name, batch),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    # a constant weight becomes an INT8 initializer read by one DequantizeLinear
                    "AddQDQPairToWeight": False,
                },
            )
        except GslimError:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's quantizer has no common error type
            raise GslimError(f"INT8 quantization of {fp32_onnx.name} failed: {first_line(exc)}") from exc
    structure = qdq_structure(out_path)
    if structure["quantized_ops"] == 0:
        raise GslimError(f"INT8 quantization of {fp32_onnx.name} quantized no Conv/Gemm/MatMul")
    return {
        "method": method,
        "calibration_images": int(calib_images.shape[0]),
        "format": "QDQ, symmetric signed INT8, per-channel weights, per-tensor activations, FP32 bias",
        "quantized_op_types": list(QUANTIZED_OPS),
        **structure,
    }


def qdq_structure(path: Path) -> dict:
    """Counts and checks of a Q/DQ file: zero points all 0, INT8 types, per-channel weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    nonzero, types, per_channel_weights = 0, set(), 0
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            nonzero += int(np.count_nonzero(zp))
            types.add(str(zp.dtype))
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits:
            if numpy_helper.to_array(inits[n.input[1]]).size > 1:
                per_channel_weights += 1
    produced = {o: n for n in model.graph.node for o in n.output}
    quantized = 0
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS and n.input and n.input[0] in produced:
            quantized += produced[n.input[0]].op_type == "DequantizeLinear"
    return {
        "quantize_nodes": len(q),
        "dequantize_nodes": len(dq),
        "nonzero_zero_points": nonzero,
        "zero_point_types": sorted(types),
        "per_channel_weights": per_channel_weights,
        "quantized_ops": quantized,
    }


def int8_accuracy(
    model: torch.nn.Module,
    int8_onnx: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_top1_drop: float,
    threads: Optional[int] = None,
) -> dict:
    """INT8 ONNX (ONNX Runtime CPU) against the FP32 PyTorch model on labelled images: top-1 of
    both, the drop in points and the top-1 agreement. ``passed`` is False (with ``error``) when
    the drop exceeds ``max_top1_drop`` points."""
    from gslim.export.parity import batch_plan, ort_cpu, run_plan, torch_logits

    images = images.detach().cpu().float().contiguous()
    labels = labels.detach().cpu().long()
    reference = torch_logits(model, images)
    with ort_cpu(int8_onnx, threads) as runner:
        plan = batch_plan(images.shape[0], 32, runner.fixed_batch)
        rows, outputs, sizes = run_plan(runner.infer, images, plan)
    # the dynamic-batch plan repeats some images at batch 1 and 8: score each image once
    rows = np.asarray(rows)
    rows, first = np.unique(rows, return_index=True)
    outputs = outputs[first]
    ref_top1 = reference[rows].argmax(1)
    int8_top1 = outputs.argmax(1)
    y = labels.numpy()[rows]
    fp32_acc = 100.0 * float((ref_top1 == y).mean())
    int8_acc = 100.0 * float((int8_top1 == y).mean())
    drop = fp32_acc - int8_acc
    report = {
        "path": str(int8_onnx),
        "runtime": "onnxruntime CPUExecutionProvider",
        "reference": "PyTorch FP32",
        "images": int(len(rows)),
        "batch_sizes": sizes,
        "fp32_top1": round(fp32_acc, 3),
        "int8_top1": round(int8_acc, 3),
        "top1_drop": round(drop, 3),
        "top1_agreement": float((ref_top1 == int8_top1).mean()),
        "max_top1_drop": max_top1_drop,
        "passed": bool(np.isfinite(outputs).all() and drop <= max_top1_drop),
    }
    if not report["passed"]:
        report["error"] = (
            f"INT8 ONNX {Path(int8_onnx).name}: top-1 {int8_acc:.2f}% vs FP32 {fp32_acc:.2f}% on {len(rows)} "
            f"validation images, a drop of {drop:.2f} points (allowed: export.int8_max_top1_drop = {max_top1_drop})"
        )
    return report
