"""Export: ONNX with parity, FP16 ONNX, the export stage and CLI, and TensorRT engines (GPU only)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gslim.errors import GslimError, MissingDependencyError
from gslim.models import ModelSpec, build_model, save_checkpoint
from gslim.recipe import load_recipe

SIZE = 32
CLASSES = 10
FAST_ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18")
ALL_ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50")


def calibrated_model(arch: str, size: int = SIZE, seed: int = 0) -> torch.nn.Module:
    """Random weights, but BatchNorm statistics measured on data (as after training), eval mode.

    Freshly initialised torchvision models have running stats of 0/1 that make deep nets
    produce vanishing logits (~1e-10): any parity check would pass trivially on those.
    """
    torch.manual_seed(seed)
    model = build_model(arch, CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def synthetic_recipe(**export):
    overrides = {
        "data.kind": "synthetic",
        "data.synthetic_val": 64,
        "data.synthetic_train": 64,
        "data.calib_images": 32,
        "export.parity_images": 24,
    }
    overrides.update({f"export.{k}": v for k, v in export.items()})
    return load_recipe(None, overrides)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Real pipeline images: the synthetic recipe's validation split, as the export stage reads them."""
    from gslim.export.stage import parity_images

    x = parity_images(synthetic_recipe(), SIZE, CLASSES, 24)
    assert x.shape == (24, 3, SIZE, SIZE)
    return x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (model, dynamic-batch ONNX path, default dynamo exporter), exported once per module."""
    from gslim.export.onnx import export_onnx

    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(arch: str):
        if arch not in cache:
            model = calibrated_model(arch)
            d = tmp_path_factory.mktemp(arch)
            path = export_onnx(model, SIZE, d / "model.onnx")
            cache[arch] = (model, path)
        return cache[arch]

    return get


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_export_and_parity(arch, exported, images):
    import onnx

    from gslim.export.parity import onnx_parity

    model, path = exported(arch)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # self-contained, no temp left
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert not any(
        t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
        for t in m.graph.initializer
    )
    onnx.checker.check_model(str(path), full_check=True)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18  # dynamo exporter

    r = onnx_parity(model, path, images, tolerance=1e-4)
    assert r["passed"] and r["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_reference"])
    assert r["top1_agreement"] == 1.0
    assert r["images"] == 24 and {1, 8} <= set(r["batch_sizes"])
    assert r["max_abs_reference"] > 1e-2  # the check is not trivially passed by vanishing logits
    assert set(r) >= {"max_abs_diff", "mean_abs_diff", "top1_agreement", "images", "tolerance", "passed"}


def test_one_dynamic_file_runs_batch_1_and_8(exported, images):
    import onnxruntime as ort

    model, path = exported("resnet18")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(images[:8]).numpy()
    for b in (1, 8):
        out = sess.run(["logits"], {"input": images[:b].numpy()})[0]
        assert out.shape == (b, CLASSES)
        np.testing.assert_allclose(out, ref[:b], atol=1e-4, rtol=0)


def test_opset17_uses_torchscript_exporter_and_passes(tmp_path, images):
    import onnx

    from gslim.export.onnx import export_onnx, onnx_opset
    from gslim.export.parity import onnx_parity

    model = calibrated_model("mobilenet_v3_small")
    path = export_onnx(model, SIZE, tmp_path / "m17.onnx", opset=17)
    assert onnx_opset(path) == 17
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    r = onnx_parity(model, path, images, tolerance=1e-4)
    assert r["passed"] and {1, 8} <= set(r["batch_sizes"])


def test_static_batch_export(tmp_path, images):
    import onnx

    from gslim.export.onnx import export_onnx
    from gslim.export.parity import onnx_parity

    model = calibrated_model("resnet18")
    path = export_onnx(model, SIZE, tmp_path / "static.onnx", opset=17, dynamic_batch=False, batch=4)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, SIZE, SIZE]
    r = onnx_parity(model, path, images[:10], tolerance=1e-4)  # 10 images: last batch padded
    assert r["passed"] and r["batch_sizes"] == [4]


def test_export_leaves_callers_model_untouched(tmp_path):
    from gslim.export.onnx import export_onnx

    model = calibrated_model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, SIZE, tmp_path / "m.onnx", opset=17)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_perturbed_model_fails_parity_with_one_line(exported, images):
    from gslim.export.parity import onnx_parity

    model, path = exported("mobilenet_v2")
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        head = perturbed.classifier[-1]
        head.weight.add_(1e-2 * torch.randn_like(head.weight))
        head.bias.add_(1e-3)
    with pytest.raises(GslimError) as err:
        onnx_parity(perturbed, path, images, tolerance=1e-4)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("ONNX parity failed for model.onnx: max |onnxruntime - PyTorch| = ")
    assert "exceeds" in msg and "tolerance 0.0001" in msg and "top-1 agreement" in msg

    r = onnx_parity(perturbed, path, images, tolerance=1e-4, raise_on_fail=False)
    assert not r["passed"] and r["max_abs_diff"] > 1e-4 and r["error"] == msg


def test_tolerance_scales_with_logit_magnitude_above_one():
    from gslim.export.parity import batch_plan, limit_for

    assert limit_for(1e-4, 0.3, relative=True) == 1e-4  # usual logit range: absolute
    assert limit_for(1e-4, 22.0, relative=True) == pytest.approx(2.2e-3)  # confident model: scaled
    assert limit_for(1e-4, 22.0, relative=False) == 1e-4
    # dynamic: batch 1 and 8 first, then every image once; static: padded chunks of the fixed batch
    plan = batch_plan(20, 16, None)
    assert [len(p) for p in plan] == [1, 8, 16, 4]
    assert sorted(np.concatenate(plan[2:]).tolist()) == list(range(20))
    assert [p.tolist() for p in batch_plan(5, 32, 4)] == [[0, 1, 2, 3], [4, 0, 1, 2]]


def test_unexpressible_op_fails_as_one_gslim_error(tmp_path):
    from gslim.export.onnx import export_onnx

    class Triu(torch.nn.Module):  # Trilu exists from opset 14 on
        def forward(self, x):
            return torch.triu(x).flatten(1)

    with pytest.raises(GslimError) as err:
        export_onnx(Triu(), 8, tmp_path / "t.onnx", opset=13)
    msg = str(err.value)
    assert "\n" not in msg and "opset 13" in msg and "aten::triu" in msg
    assert not list(tmp_path.iterdir())  # nothing half-written

    with pytest.raises(GslimError, match="opset must be between 11 and 23"):
        export_onnx(Triu(), 8, tmp_path / "t.onnx", opset=9)


# --------------------------------------------------------------------------- FP16 ONNX


def test_fp16_onnx_runs_in_ort_cpu_within_tolerance(exported, images, tmp_path):
    import onnx

    from gslim.export.onnx import convert_fp16, has_float16
    from gslim.export.parity import FP16_TOLERANCE, onnx_parity

    model, path = exported("resnet18")
    out = convert_fp16(path, tmp_path / "model.fp16.onnx")
    m = onnx.load(str(out))
    f32 = onnx.TensorProto.FLOAT
    assert m.graph.input[0].type.tensor_type.elem_type == f32  # keep_io_types
    assert m.graph.output[0].type.tensor_type.elem_type == f32
    assert has_float16(out) and not has_float16(path)
    assert out.stat().st_size < 0.6 * path.stat().st_size  # weights really are half size
    onnx.checker.check_model(str(out), full_check=True)

    r = onnx_parity(model, out, images, tolerance=FP16_TOLERANCE)
    assert r["passed"] and r["tolerance_kind"] == "relative"
    assert r["max_abs_diff"] > 1e-6  # really computed in FP16
    assert r["top1_agreement"] >= 0.95


def test_fp16_without_onnxconverter_common(monkeypatch, exported, tmp_path):
    from gslim.export.onnx import convert_fp16

    _, path = exported("resnet18")
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    with pytest.raises(MissingDependencyError, match="pip install onnxconverter-common"):
        convert_fp16(path, tmp_path / "x.onnx")


# --------------------------------------------------------------------------- stage and CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    save_checkpoint(calibrated_model("resnet18"), ModelSpec("resnet18", CLASSES, SIZE), path)
    return path


def test_export_stage_writes_artifacts_and_refuses_overwrite(checkpoint, tmp_path):
    from gslim.export.stage import export_stage

    recipe = synthetic_recipe(opset=17, fp16_onnx=True)
    out = tmp_path / "run"
    summary = export_stage(checkpoint, recipe, out, progress=False)
    assert summary["onnx"] == str(out / "model.onnx") and summary["onnx_fp16"] == str(out / "model.fp16.onnx")
    assert summary["engine"] is None and summary["passed"]
    assert sorted(p.name for p in out.iterdir()) == ["model.fp16.onnx", "model.onnx", "parity.json"]
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["onnx"]["passed"] and report["onnx_fp16"]["passed"]
    assert report["onnx"]["opset"] == 17 and report["onnx"]["exporter"] == "torchscript"
    assert report["onnx"]["tolerance"] == 1e-4 and report["onnx_fp16"]["tolerance_kind"] == "relative"
    assert report["data"] == {"kind": "synthetic", "split": "val", "images": 24}
    assert report["environment"]["onnxruntime"]

    stamp = (out / "model.onnx").stat().st_mtime_ns
    with pytest.raises(GslimError, match="already holds a finished ONNX export; pass --force"):
        export_stage(checkpoint, recipe, out, progress=False)
    assert (out / "model.onnx").stat().st_mtime_ns == stamp
    export_stage(checkpoint, synthetic_recipe(opset=17), out, progress=False, force=True)
    assert (out / "model.onnx").stat().st_mtime_ns != stamp


def test_export_stage_failed_parity_keeps_no_artifact(checkpoint, tmp_path):
    from gslim.export.stage import export_stage

    out = tmp_path / "run"
    recipe = synthetic_recipe(opset=17, tolerance=1e-12)  # impossible tolerance
    with pytest.raises(GslimError, match="ONNX parity failed"):
        export_stage(checkpoint, recipe, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["parity.json"]  # the record, not the artifact
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and "exceeds" in report["error"] and "tolerance 1e-12" in report["error"]


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from gslim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_export_and_refusal(checkpoint, tmp_path, capsys):
    onnx_path = tmp_path / "out" / "net.onnx"
    args = [
        "export",
        str(checkpoint),
        "--set",
        "data.kind=synthetic",
        "--opset",
        "17",
        "--onnx",
        str(onnx_path),
        "--parity-images",
        "16",
        "--quiet",
    ]
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    assert onnx_path.is_file() and (onnx_path.parent / "parity.json").is_file()
    assert "parity passed" in out

    code, out, err = _cli(args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"gslim: error: {onnx_path} already holds a finished ONNX export; pass --force to overwrite it"
    ]


def test_cli_engine_without_tensorrt_says_what_to_install(checkpoint, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; this checks the message shown where it is not")
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gslim",
            "export",
            str(checkpoint),
            "--set",
            "data.kind=synthetic",
            "--out-dir",
            str(out),
            "--engine",
            str(out / "x.engine"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == MissingDependencyError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gslim: error: TensorRT is not installed")
    assert "pip install 'gslim[gpu]'" in lines[0] and "python3-libnvinfer" in lines[0]
    assert not out.exists() or not any(out.iterdir())  # failed before any export work


def test_cli_help_documents_every_option(capsys):
    code, out, _ = _cli(["export", "--help"], capsys)
    assert code == 0
    for opt in (
        "--recipe",
        "--set",
        "--onnx",
        "--fp16-onnx",
        "--opset",
        "--static-batch",
        "--engine",
        "--precision",
        "--min-batch",
        "--opt-batch",
        "--max-batch",
        "--workspace-mb",
        "--opt-level",
        "--timing-cache",
        "--dla-core",
        "--tolerance",
        "--parity-images",
        "--force",
    ):
        assert opt in out


# --------------------------------------------------------------------------- all six models


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_all_named_models_export_at_64(arch, tmp_path):
    from gslim.export.onnx import export_onnx
    from gslim.export.parity import onnx_parity
    from gslim.export.stage import parity_images

    model = calibrated_model(arch, size=64)
    path = export_onnx(model, 64, tmp_path / f"{arch}.onnx")
    x = parity_images(synthetic_recipe(), 64, CLASSES, 9)
    r = onnx_parity(model, path, x, tolerance=1e-4)
    assert r["passed"] and {1, 8} <= set(r["batch_sizes"])


# --------------------------------------------------------------------------- TensorRT (GPU machines)


def _need_tensorrt():
    trt = pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installed (pip install 'gslim[gpu]'); engine tests need it and a CUDA GPU",
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engine tests need a CUDA GPU (torch.cuda.is_available() is False)")
    return trt


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_and_parity(precision, exported, images, tmp_path):
    _need_tensorrt()
    from gslim.export.tensorrt import TrtRunner, build_engine, engine_parity

    _, path = exported("resnet18")
    cache = tmp_path / "timing.cache"
    info = build_engine(
        path,
        tmp_path / f"{precision}.engine",
        precision=precision,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_mb=512,
        optimization_level=2,
        timing_cache=cache,
    )
    assert Path(info["path"]).is_file() and info["bytes"] > 0 and cache.is_file()
    assert info["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert info["precision"] == precision
    with TrtRunner(Path(info["path"])) as runner:
        assert (runner.min_batch, runner.opt_batch, runner.max_batch) == (1, 4, 8)
        assert runner.infer(images[:1]).shape == (1, CLASSES)
        assert runner.infer(images[:8]).shape == (8, CLASSES)
        with pytest.raises(GslimError, match="outside the engine's profile"):
            runner.infer(images[:9])
    r = engine_parity(Path(info["path"]), path, images, precision=precision)
    assert r["passed"] and {1, 8} <= set(r["batch_sizes"]) and r["top1_agreement"] >= 0.9

    again = build_engine(
        path,
        tmp_path / f"{precision}.2.engine",
        precision=precision,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_mb=512,
        optimization_level=2,
        timing_cache=cache,
    )
    assert again["timing_cache"]["reused"] is True


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_int8_build_runs(exported, images, tmp_path):
    trt = _need_tensorrt()
    from gslim.export.int8 import quantize_int8
    from gslim.export.tensorrt import build_engine, engine_parity, trt_major

    _, path = exported("resnet18")
    qdq = tmp_path / "model.int8.onnx"
    quantize_int8(path, qdq, images)
    info = build_engine(
        path,
        tmp_path / "int8.engine",
        precision="int8",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_mb=512,
        int8_onnx=qdq,
    )
    assert "Q/DQ" in info["mode"] and (trt_major(trt) < 10 or "strongly-typed" in info["mode"])
    r = engine_parity(Path(info["path"]), path, images, precision="int8", min_top1=0.0, raise_on_fail=False)
    assert np.isfinite(r["max_abs_diff"]) and 0.0 <= r["top1_agreement"] <= 1.0


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_export_stage_with_engine(checkpoint, tmp_path):
    _need_tensorrt()
    from gslim.export.stage import export_stage

    recipe = synthetic_recipe(
        engine=True, precision="fp16", fp16_onnx=True, min_batch=1, opt_batch=4, max_batch=8, workspace_mb=512
    )
    summary = export_stage(
        checkpoint, recipe, tmp_path / "run", progress=False, timing_cache=tmp_path / "timing.cache"
    )
    assert Path(summary["engine"]).is_file()
    report = json.loads((tmp_path / "run" / "parity.json").read_text())
    assert report["engine"]["passed"] and report["engine"]["precision"] == "fp16"
    assert report["engine"]["build"]["tensorrt"]


# --------------------------------------------------------------------------- stand-in TensorRT
# The real engine tests above need a GPU. These run the version dispatch of build_engine
# (10.x flags vs 11.x strong typing; INT8 from the Q/DQ ONNX on both) against a minimal stand-in module that
# records what was asked of it; the API names it offers are those of the 10.x / 11.x bindings.


class _Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def _fake_tensorrt(major: int, fast_fp16: bool = True):
    import importlib.machinery
    import types

    from gslim.export.onnx import has_float16

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks modules up
    trt.__version__ = f"{major}.1.0"
    trt.calls = {"flags": set(), "cleared": set(), "profiles": [], "parsed": None, "network_flags": None}
    flag_names = ["TF32", "GPU_FALLBACK"] + (["FP16", "INT8"] if major < 11 else [])
    trt.BuilderFlag = _Enum(*flag_names)
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.DataType = _Enum("FLOAT", "HALF", "INT8")
    trt.DeviceType = _Enum("GPU", "DLA")
    trt.NetworkDefinitionCreationFlag = _Enum("EXPLICIT_BATCH", "STRONGLY_TYPED")

    class ILogger:
        Severity = _Enum("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")

        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Layer:
        def __init__(self, dtype):
            self.num_outputs = 1
            self._out = Tensor("t", (1,), dtype)

        def get_output(self, i):
            return self._out

    class Network:
        num_inputs = num_outputs = 1

        def __init__(self):
            self.num_layers = 0
            self.layer_dtype = trt.DataType.FLOAT

        def get_input(self, i):
            return Tensor("input", (-1, 3, SIZE, SIZE), trt.DataType.FLOAT)

        def get_layer(self, i):
            return Layer(self.layer_dtype)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            trt.calls["parsed"] = path
            self.network.num_layers = 1
            if has_float16(Path(path)):
                self.network.layer_dtype = trt.DataType.HALF
            return True

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            trt.calls["profiles"].append((name, mn, opt, mx))

    class Cache:
        def serialize(self):
            return b"TIMING-CACHE"

    class Config:
        def set_flag(self, f):
            trt.calls["flags"].add(f)

        def clear_flag(self, f):
            trt.calls["cleared"].add(f)

        def set_memory_pool_limit(self, pool, size):
            trt.calls["workspace"] = size

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, blob):
            trt.calls["timing_blob"] = blob
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return Cache()

    class Builder:
        num_DLA_cores = 0
        platform_has_fast_int8 = True

        def __init__(self, logger):
            if major < 11:
                self.platform_has_fast_fp16 = fast_fp16

        def create_builder_config(self):
            return Config()

        def create_network(self, flags=0):
            trt.calls["network_flags"] = flags
            return Network()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE-BYTES"

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    import gslim.export.tensorrt as T

    def install(major: int, fast_fp16: bool = True):
        trt = _fake_tensorrt(major, fast_fp16)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(T, "require_cuda", lambda: None)
        monkeypatch.setattr(T, "_device_name", lambda: "stand-in GPU")
        return trt

    return install


def test_build_engine_v10_uses_builder_flag_and_timing_cache(fake_trt, exported, tmp_path):
    from gslim.export.tensorrt import build_engine

    _, path = exported("resnet18")  # exported before the stand-in replaces tensorrt
    trt = fake_trt(10)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    info = build_engine(
        path,
        tmp_path / "m.engine",
        precision="fp16",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_mb=64,
        timing_cache=cache,
    )
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE-BYTES"
    assert cache.read_bytes() == b"TIMING-CACHE" and trt.calls["timing_blob"] == b"OLD"
    assert info["timing_cache"]["reused"] is True
    assert trt.BuilderFlag.FP16 in trt.calls["flags"] and "BuilderFlag.FP16" in info["mode"]
    assert trt.calls["profiles"] == [("input", (1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))]
    assert trt.calls["workspace"] == 64 << 20 and trt.calls["parsed"] == str(path)

    fake_trt(10)
    build_engine(path, tmp_path / "f32.engine", precision="fp32", min_batch=1, opt_batch=1, max_batch=1)
    assert sys.modules["tensorrt"].BuilderFlag.TF32 in sys.modules["tensorrt"].calls["cleared"]  # true FP32


def test_build_engine_v10_refuses_fp16_without_fast_fp16(fake_trt, exported, tmp_path):
    from gslim.export.tensorrt import build_engine

    _, path = exported("resnet18")  # exported before the stand-in replaces tensorrt
    fake_trt(10, fast_fp16=False)
    with pytest.raises(GslimError, match="no fast FP16.*refusing to build an FP32 engine"):
        build_engine(path, tmp_path / "m.engine", precision="fp16")
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(GslimError, match="no Q/DQ nodes"):  # INT8 comes from a Q/DQ ONNX, never a calibrator
        build_engine(path, tmp_path / "m.engine", precision="int8")


def test_build_engine_v11_builds_fp16_from_the_fp16_onnx(fake_trt, exported, tmp_path):
    from gslim.export.tensorrt import build_engine

    _, path = exported("resnet18")  # exported before the stand-in replaces tensorrt
    trt = fake_trt(11)
    assert not hasattr(trt.BuilderFlag, "FP16")  # gone in 11: using it would raise
    info = build_engine(path, tmp_path / "m.engine", precision="fp16", min_batch=1, opt_batch=2, max_batch=4)
    assert "strongly-typed FP16 ONNX" in info["mode"] and "(temporary)" in info["onnx"]
    assert trt.calls["parsed"] != str(path) and trt.calls["flags"] == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine"]  # the converted ONNX was scratch


@pytest.fixture(scope="module")
def qdq_onnx(exported, images, tmp_path_factory):
    from gslim.export.int8 import quantize_int8

    _, path = exported("resnet18")
    out = tmp_path_factory.mktemp("qdq") / "model.int8.onnx"
    quantize_int8(path, out, images)
    return path, out


@pytest.mark.parametrize("major", [10, 11])
def test_build_engine_int8_from_qdq_on_every_major(fake_trt, qdq_onnx, tmp_path, major):
    """One INT8 path: the Q/DQ ONNX in a strongly typed network without precision flags (the
    STRONGLY_TYPED creation flag on 10.x; 11.x has no other mode)."""
    from gslim.export.tensorrt import build_engine

    fp32, qdq = qdq_onnx  # made before the stand-in replaces tensorrt
    trt = fake_trt(major)
    info = build_engine(
        fp32, tmp_path / "m.engine", precision="int8", int8_onnx=qdq, min_batch=1, opt_batch=1, max_batch=2
    )
    assert trt.calls["parsed"] == str(qdq)
    assert info["mode"] == "strongly-typed Q/DQ ONNX" and trt.calls["flags"] == set()
    expected = 0 if major >= 11 else 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.calls["network_flags"] == expected
    with pytest.raises(GslimError, match="no Q/DQ nodes"):
        build_engine(fp32, tmp_path / "n.engine", precision="int8")


def test_engine_request_without_tensorrt_fails_before_export(monkeypatch, checkpoint, tmp_path):
    from gslim.export.stage import export_stage

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'gslim\[gpu\]'"):
        export_stage(checkpoint, synthetic_recipe(engine=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- INT8 (Q/DQ ONNX)


def test_int8_qdq_structure_is_what_tensorrt_accepts_and_runs_in_ort(exported, images, tmp_path):
    import onnx

    from gslim.export.int8 import int8_accuracy, quantize_int8

    model, path = exported("mobilenet_v2")
    out = tmp_path / "model.int8.onnx"
    info = quantize_int8(path, out, images, method="minmax")
    weighted = [n for n in onnx.load(str(out)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert info["quantized_ops"] == len(weighted) > 0  # every weighted op reads a DequantizeLinear
    assert info["nonzero_zero_points"] == 0 and info["zero_point_types"] == ["int8"]  # symmetric, signed
    assert info["per_channel_weights"] == len(weighted)  # one scale per output channel
    g = onnx.load(str(out)).graph
    inits = {t.name for t in g.initializer}
    axes = [
        a.i
        for n in g.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
        for a in n.attribute
        if a.name == "axis"
    ]
    assert axes and set(axes) == {0}  # the output-channel axis of Conv and of Gemm(transB=1) weights
    # runs in ONNX Runtime's CPU provider and agrees with FP32 on most images
    labels = torch.as_tensor(torch_argmax(model, images))
    acc = int8_accuracy(model, out, images, labels, max_top1_drop=100.0)
    assert acc["passed"] and acc["fp32_top1"] == 100.0 and acc["images"] == images.shape[0]


def torch_argmax(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_int8_accuracy_gate_fails_with_one_line(exported, images, tmp_path):
    from gslim.export.int8 import int8_accuracy, quantize_int8

    model, path = exported("resnet18")
    out = tmp_path / "bad.int8.onnx"
    # ranges calibrated on images 1000x too small: every activation saturates, accuracy collapses
    quantize_int8(path, out, images * 1e-3)
    acc = int8_accuracy(model, out, images, torch_argmax(model, images), max_top1_drop=1.0)
    assert not acc["passed"] and acc["top1_drop"] > 1.0
    assert "\n" not in acc["error"] and "export.int8_max_top1_drop" in acc["error"]


def test_export_stage_int8_publishes_gated_artifact(checkpoint, tmp_path):
    from gslim.export.stage import export_stage

    summary = export_stage(
        checkpoint, synthetic_recipe(int8=True, int8_max_top1_drop=100.0), tmp_path / "run", progress=False
    )
    assert Path(summary["onnx_int8"]).name == "model.int8.onnx" and Path(summary["onnx_int8"]).is_file()
    report = json.loads((tmp_path / "run" / "parity.json").read_text())
    r = report["onnx_int8"]
    assert r["passed"] and r["quantization"]["method"] == "minmax" and "int8_top1" in r
    assert r["quantization"]["calibration_images"] == 32  # data.calib_images, compress's subset


def test_export_stage_int8_failing_gate_keeps_nothing(checkpoint, tmp_path, monkeypatch):
    import gslim.export.stage as E

    real = E._calibration
    # a real quantization with ruined ranges (as from unrepresentative calibration images)
    monkeypatch.setattr(E, "_calibration", lambda *a: (real(*a)[0] * 1e-3, None))
    recipe = synthetic_recipe(int8=True, int8_max_top1_drop=0.0, int8_eval_images=64)
    with pytest.raises(GslimError, match="INT8 ONNX model.int8.onnx: top-1"):
        E.export_stage(checkpoint, recipe, tmp_path / "run", progress=False)
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["parity.json"]  # no model.onnx, no model.int8.onnx, no staging directory
    report = json.loads((tmp_path / "run" / "parity.json").read_text())
    assert report["passed"] is False and report["onnx_int8"]["passed"] is False


def test_cli_export_int8(checkpoint, tmp_path, capsys):
    code, out, err = _cli(
        [
            "export",
            str(checkpoint),
            "--out-dir",
            str(tmp_path / "o"),
            "--int8",
            "--int8-calibration",
            "percentile",
            "--int8-max-drop",
            "100",
            "--set",
            "data.kind=synthetic",
            "--set",
            "data.calib_images=16",
        ],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "o" / "model.int8.onnx").is_file() and "model.int8.onnx" in out
    report = json.loads((tmp_path / "o" / "parity.json").read_text())
    assert report["onnx_int8"]["quantization"]["method"] == "percentile"
    code, _, err = _cli(
        ["export", str(checkpoint), "--out-dir", str(tmp_path / "p"), "--int8", "--int8-calibration", "kl"],
        capsys,
    )
    assert code == 2 and "--int8-calibration" in err and len(err.strip().splitlines()) == 1
