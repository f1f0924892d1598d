"""ONNX export with a named, optionally dynamic batch, the full checker, and FP16 conversion.

Opset 18 and newer (and the default) go through torch's dynamo exporter
(``torch.export`` → ONNX); opset 17 and older go through the TorchScript exporter
(``dynamo=False``), which is what old TensorRT releases (JetPack 5) can parse. The model is
exported from a CPU, FP32, eval-mode copy, so the caller's module is never changed.

The file is self-contained (weights inside) below protobuf's 2 GiB limit and uses external
data only above it. Every file is produced in a private temporary directory next to the
destination and renamed into place only after it passed ``onnx.checker`` with
``full_check=True``: an interrupted or failed export never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from gslim.artifacts import staged_file
from gslim.errors import GslimError, MissingDependencyError, first_line

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
#: Opsets at or below this use the TorchScript exporter (the dynamo exporter emits opset >= 18).
TORCHSCRIPT_MAX_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 23
#: Above this many bytes of weights the file gets external data (protobuf cannot hold 2 GiB).
EXTERNAL_DATA_BYTES = 2**31 - 2**27
FP16_INSTALL_HINT = "pip install onnxconverter-common (or pip install 'gslim[fp16]')"


def exporter_for(opset: Optional[int]) -> str:
    """'torchscript' for opset <= 17, else 'dynamo' (None means the dynamo exporter's default)."""
    return "torchscript" if opset is not None and opset <= TORCHSCRIPT_MAX_OPSET else "dynamo"


def export_onnx(
    model: nn.Module,
    input_size: int,
    path: Path,
    *,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    batch: int = 1,
    simplify: Optional[bool] = None,
    channels: int = 3,
    atomic: bool = True,
) -> Path:
    """Export ``model`` to ``path`` with input ``input`` (N, C, S, S) and output ``logits``.

    ``dynamic_batch`` names the batch axis ``batch`` (any size at run time); otherwise the
    batch is fixed at ``batch``. ``opset`` None uses the dynamo exporter's default opset,
    <= 17 the TorchScript exporter. ``simplify`` runs onnxslim: None = when it is installed,
    True = required, False = never. Raises :class:`GslimError` with the exporter's first
    line when the model cannot be expressed at the requested opset. ``atomic=False`` writes
    ``path`` directly, for a caller that already stages it (:class:`gslim.artifacts.Transaction`).
    """
    _check_args(input_size, opset, batch)
    dest = Path(path)
    exporter = exporter_for(opset)
    m = export_copy(model)
    sample_batch = max(2, batch) if dynamic_batch else batch  # batch 1 would specialise torch.export
    x = torch.randn(
        sample_batch, channels, input_size, input_size, generator=torch.Generator().manual_seed(0)
    )
    try:
        with torch.no_grad():
            m(x)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run this input is a user error
        raise GslimError(
            f"the model does not run on a {channels}x{input_size}x{input_size} input: {first_line(exc)}"
        ) from exc
    big = weight_bytes(m) > EXTERNAL_DATA_BYTES

    with staged_file(dest) if atomic else contextlib.nullcontext(dest) as tmp:
        try:
            with _quiet():
                if exporter == "torchscript":
                    _export_torchscript(m, x, tmp, opset, dynamic_batch)
                else:
                    _export_dynamo(m, x, tmp, opset, dynamic_batch, big)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - the exporter's errors have no common base class
            where = f"opset {opset}" if opset is not None else "default opset"
            detail = first_line(exc)
            cause = exc.__cause__
            if cause is not None and exporter == "dynamo":
                detail += f" ({type(cause).__name__}: {first_line(cause, 200)})"
            raise GslimError(f"ONNX export failed ({exporter} exporter, {where}): {detail}") from exc
        if not tmp.is_file():
            raise GslimError(f"ONNX export wrote no file for {dest}")
        _finish(tmp, simplify, big)
    return dest


def export_copy(model: nn.Module) -> nn.Module:
    """A CPU, FP32, eval-mode deep copy with gradients off (the caller's model is untouched)."""
    inner = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    m = copy.deepcopy(inner).cpu().float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file (read without its weights)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_fp16(onnx_path: Path, out_path: Path) -> Path:
    """FP16 weights and activations with FP32 inputs/outputs (onnxconverter-common, keep_io_types)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise MissingDependencyError(
            f"FP16 ONNX export needs onnxconverter-common: {FP16_INSTALL_HINT}"
        ) from exc
    src, dest = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise GslimError(f"ONNX file not found: {src}")
    if src.resolve() == dest.resolve():
        raise GslimError(f"the FP16 ONNX must not overwrite its FP32 source {src}")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
        raise GslimError(f"cannot read ONNX file {src}: {first_line(exc)}") from exc
    try:
        with warnings.catch_warnings():
            # "the float32 number 1e-08 will be truncated to 1e-07": expected for tiny weights
            warnings.simplefilter("ignore")
            model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # noqa: BLE001
        raise GslimError(f"FP16 conversion of {src} failed: {first_line(exc)}") from exc
    big = sum(len(t.raw_data) for t in model16.graph.initializer) > EXTERNAL_DATA_BYTES
    with staged_file(dest) as tmp:
        _save_proto(model16, tmp, big)
        _finish(tmp, simplify=False, big=big)
    return dest


def has_float16(path: Path) -> bool:
    """Whether an ONNX file computes in FP16 (FP16 initializers or a Cast to FP16)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    f16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == f16 for t in m.graph.initializer):
        return True
    for node in m.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in node.attribute):
            return True
    return False


def has_qdq(path: Path) -> bool:
    """Whether an ONNX file is explicitly quantized (has QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


# --------------------------------------------------------------------------- internals


def _check_args(input_size: int, opset: Optional[int], batch: int) -> None:
    if not isinstance(input_size, int) or input_size < 1:
        raise GslimError(f"input size must be a positive integer, got {input_size!r}")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise GslimError(f"ONNX opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    if batch < 1:
        raise GslimError(f"export batch must be >= 1, got {batch}")


def _export_dynamo(m: nn.Module, x: torch.Tensor, tmp: Path, opset: Optional[int], dynamic: bool, big: bool):
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic else None
    program = torch.onnx.export(
        m,
        (x,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        verbose=False,
        report=False,
    )
    program.save(str(tmp), external_data=big)


def _export_torchscript(m: nn.Module, x: torch.Tensor, tmp: Path, opset: int, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # chosen on purpose for opset <= 17
        torch.onnx.export(
            m,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _finish(tmp: Path, simplify: Optional[bool], big: bool) -> None:
    """Optional onnxslim pass, I/O name check, then the full checker on the file."""
    import onnx

    if simplify or simplify is None:
        _maybe_slim(tmp, required=bool(simplify), big=big)
    m = onnx.load(str(tmp), load_external_data=False)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
        raise GslimError(
            f"the exported graph has inputs {ins} and outputs {outs}; expected [{INPUT_NAME!r}] and "
            f"[{OUTPUT_NAME!r}] (a model with several inputs or outputs is not a classifier gslim exports)"
        )
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
        raise GslimError(f"the exported ONNX fails onnx.checker (full_check): {first_line(exc)}") from exc


def _maybe_slim(tmp: Path, required: bool, big: bool) -> None:
    import onnx

    try:
        import onnxslim
    except ImportError as exc:
        if required:
            raise MissingDependencyError("ONNX graph cleanup needs onnxslim: pip install onnxslim") from exc
        return
    try:
        with _quiet():
            slim = onnxslim.slim(onnx.load(str(tmp)))
    except Exception as exc:  # noqa: BLE001 - cleanup is optional; keep the unslimmed graph
        if required:
            raise GslimError(f"onnxslim failed: {first_line(exc)}") from exc
        warnings.warn(f"onnxslim failed, keeping the exported graph as is: {first_line(exc)}", stacklevel=3)
        return
    if slim is None:
        return
    if [i.name for i in slim.graph.input] != [INPUT_NAME] or [o.name for o in slim.graph.output] != [
        OUTPUT_NAME
    ]:
        return  # never trade the contract of the I/O names for a cleanup
    for f in tmp.parent.iterdir():  # drop the old external data before rewriting
        if f != tmp:
            f.unlink()
    _save_proto(slim, tmp, big)


def _save_proto(model, path: Path, big: bool) -> None:
    import onnx

    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
        )
    else:
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the exporters' console chatter (the error, if any, is re-raised as one line)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
