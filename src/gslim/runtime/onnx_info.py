"""What an ONNX file holds (its input and weight precision) and where ONNX Runtime ran its nodes
(from a profiling trace): the checks behind the ONNX Runtime backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gslim.errors import GslimError, first_line
from gslim.runtime.base import BackendUnavailable

ORT_NP = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def onnx_io_info(path: Path) -> dict[str, Any]:
    """Input name/shape and the dominant floating-point type of the weights of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors have many types
        raise GslimError(f"cannot read ONNX file {path}: {first_line(exc)}") from exc
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise GslimError(f"{path} has {len(inputs)} inputs; gslim profiles single-input image classifiers")
    dims: list[Any] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    counts: dict[int, int] = {}
    for t in graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            n = 1
            for d in t.dims:
                n *= d
            counts[t.data_type] = counts.get(t.data_type, 0) + n
    weight_type = max(counts, key=counts.get) if counts else onnx.TensorProto.FLOAT
    weights = {
        onnx.TensorProto.FLOAT: "fp32",
        onnx.TensorProto.FLOAT16: "fp16",
        onnx.TensorProto.BFLOAT16: "bf16",
    }[weight_type]
    if any(n.op_type == "DequantizeLinear" for n in graph.node):
        weights = "int8"  # a Q/DQ file (gslim export --int8): its convolutions run on INT8 weights
    return {
        "input": inputs[0].name,
        "dims": dims,
        "weights": weights,
        "outputs": [o.name for o in graph.output],
    }


#: ops that only compute shapes: ONNX Runtime may keep them on the CPU next to a GPU EP
SHAPE_OPS = frozenset(
    {
        "Shape",
        "Size",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Slice",
        "Cast",
        "Reshape",
        "ConstantOfShape",
        "Range",
        "Expand",
        "Identity",
        "Flatten",
        "Constant",
    }
)


def node_placement(profile: Path) -> dict[str, tuple[str, str]]:
    """node name -> (op type, execution provider), from an ONNX Runtime profile (JSON trace)."""
    import json

    try:
        events = json.loads(Path(profile).read_text())
    except (OSError, ValueError) as exc:
        raise GslimError(f"cannot read ONNX Runtime's profile {profile}: {exc}") from exc
    out: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and "op_name" in args:
            name = str(e.get("name", "")).removesuffix("_kernel_time").removesuffix("_fence_before")
            name = name.removesuffix("_fence_after")
            out[name] = (str(args["op_name"]), str(args["provider"]))
    return out


def check_placement(placement: dict[str, tuple[str, str]], allowed: tuple[str, ...], backend: str) -> dict:
    """Counts per provider; raises :class:`BackendUnavailable` when a compute node runs elsewhere
    than ``allowed`` (shape-only ops on the CPU are counted, not refused)."""
    if not placement:
        raise BackendUnavailable(
            f"{backend}: ONNX Runtime's profile lists no node placement; cannot tell where the model ran"
        )
    counts: dict[str, int] = {}
    stray = []
    shape_on_cpu = 0
    for name, (op, provider) in placement.items():
        counts[provider] = counts.get(provider, 0) + 1
        if provider in allowed:
            continue
        if provider == "CPUExecutionProvider" and op in SHAPE_OPS:
            shape_on_cpu += 1
        else:
            stray.append((op, name, provider))
    if stray:
        ops = sorted({op for op, _, _ in stray})
        raise BackendUnavailable(
            f"{backend}: {len(stray)} compute node(s) ran outside {'/'.join(allowed)} ({stray[0][2]}: "
            f"{', '.join(ops[:5])}); a number under this name would not be {backend}"
        )
    return {"providers": counts, "cpu_shape_nodes": shape_on_cpu}
