"""GPU and TensorRT paths that cannot run here, checked through their logic: node placement,
the FP16 truth of ort-trt, engine rebinding, DLA gating, the shared TensorRT logger, the GPU
measurement context, and the device check in its dry mode."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gslim.errors import GslimError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    import torchvision

    from gslim.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(
        torchvision.models.mobilenet_v2(num_classes=10).eval(), 32, path, opset=17, dynamic_batch=True
    )
    return path


# --------------------------------------------------------------------------- node placement


def test_node_placement_read_from_a_real_onnxruntime_profile(small_onnx, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from gslim.runtime import BackendUnavailable, check_placement, node_placement

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    s = ort.InferenceSession(str(small_onnx), so, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})
    placement = node_placement(Path(s.end_profiling()))
    assert placement and {p for _, p in placement.values()} == {"CPUExecutionProvider"}
    assert "Conv" in {op for op, _ in placement.values()}
    assert check_placement(placement, ("CPUExecutionProvider",), "ort-cpu")["providers"][
        "CPUExecutionProvider"
    ]
    # the same nodes under a CUDA label: the number would not be ort-cuda
    with pytest.raises(
        BackendUnavailable, match=r"ort-cuda: \d+ compute node\(s\) ran outside CUDAExecutionProvider.*Conv"
    ):
        check_placement(placement, ("CUDAExecutionProvider",), "ort-cuda")


def test_shape_nodes_on_the_cpu_are_counted_not_refused():
    from gslim.runtime import check_placement

    placement = {
        "conv": ("Conv", "CUDAExecutionProvider"),
        "shape": ("Shape", "CPUExecutionProvider"),
        "gather": ("Gather", "CPUExecutionProvider"),
    }
    info = check_placement(placement, ("CUDAExecutionProvider",), "ort-cuda")
    assert info["cpu_shape_nodes"] == 2 and info["providers"]["CUDAExecutionProvider"] == 1


def test_ort_cuda_session_is_profiled_for_placement():
    from gslim.runtime import OrtCUDA, OrtTensorRT

    b = OrtCUDA.__new__(OrtCUDA)
    b.options = __import__("gslim.runtime", fromlist=["BackendOptions"]).BackendOptions()
    b._profile_dir = "/tmp/gslim-placement"  # activate() makes it
    so = b._session_options()
    assert so.enable_profiling and so.profile_file_prefix.startswith(b._profile_dir)
    assert "CUDAExecutionProvider" in OrtTensorRT.allowed_providers
    assert "CPUExecutionProvider" not in OrtTensorRT.allowed_providers + OrtCUDA.allowed_providers


# --------------------------------------------------------------------------- ort-trt FP16 truth


class _FakeCuda:
    def __init__(self, cc):
        self.cc = cc

    def get_device_capability(self, dev):
        return self.cc


def _ort_trt(cc, monkeypatch, major):
    import types

    import gslim.runtime.ort as B
    from gslim.runtime import BackendOptions

    monkeypatch.setattr(B, "loaded_libnvinfer_major", lambda: major)
    b = B.OrtTensorRT.__new__(B.OrtTensorRT)
    b.options = BackendOptions(fp16=True)
    b._torch = types.SimpleNamespace(cuda=_FakeCuda(cc))
    b._dev = "cuda:0"
    return b


def test_ort_trt_never_labels_an_fp32_engine_fp16(monkeypatch):
    from gslim.runtime.ort import BackendUnavailable, has_fast_fp16

    assert has_fast_fp16((8, 6)) and has_fast_fp16((5, 3)) and has_fast_fp16((6, 0)) and has_fast_fp16((9, 0))
    assert not has_fast_fp16((6, 1)) and not has_fast_fp16((5, 2))
    assert _ort_trt((8, 9), monkeypatch, 10)._fp16_truth() == "fp16"
    with pytest.raises(BackendUnavailable, match="sm_61.*no fast FP16"):
        _ort_trt((6, 1), monkeypatch, 10)._fp16_truth()
    with pytest.raises(BackendUnavailable, match="TensorRT 11.*FP16 ONNX"):
        _ort_trt((9, 0), monkeypatch, 11)._fp16_truth()
    assert "not seen" in _ort_trt((9, 0), monkeypatch, None)._fp16_truth()


def test_loaded_libnvinfer_major_reads_this_process():
    from gslim.runtime.ort import loaded_libnvinfer_major

    assert loaded_libnvinfer_major() is None  # no TensorRT library is loaded on this machine


# --------------------------------------------------------------------------- TensorRT runtime


class _Context:
    def __init__(self):
        self.addresses: dict[str, int] = {}
        self.accept = True

    def set_input_shape(self, name, shape):
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 10)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self.accept

    def execute_async_v3(self, stream):
        return True


def _trt_backend(monkeypatch):
    import types

    import gslim.runtime as B

    b = B.TensorRT.__new__(B.TensorRT)
    b.options, b.notes, b.path = B.BackendOptions(), [], Path("m.engine")
    b._torch, b._dev = torch, torch.device("cpu")
    b._stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    b.context = _Context()
    b.engine = types.SimpleNamespace(get_tensor_dtype=lambda n: "f32")
    b._torch_dtype = lambda t: torch.float32
    b.input_name, b._outputs = "input", ["logits"]
    b._in_dtype, b.min_batch, b.max_batch = torch.float32, 1, 8
    b._graph = None
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return b


def test_trt_infer_rebinds_the_prepared_buffers(monkeypatch):
    b = _trt_backend(monkeypatch)
    b._d_in = torch.zeros(2, 3, 8, 8)
    b._outs = b._bind(b._d_in)
    prepared = dict(b.context.addresses)
    b.infer(torch.ones(5, 3, 8, 8))  # binds temporaries of batch 5 while it runs
    assert b.context.addresses["input"] == prepared["input"] == b._d_in.data_ptr()
    assert b.context.addresses["logits"] == b._outs["logits"].data_ptr()  # live buffers, not freed ones
    assert b._outs["logits"].shape == (2, 10)


def test_trt_refused_tensor_address_is_an_error(monkeypatch):
    b = _trt_backend(monkeypatch)
    b.context.accept = False
    with pytest.raises(GslimError, match="refused the device address of tensor 'input'"):
        b._bind(torch.zeros(1, 3, 8, 8))


# --------------------------------------------------------------------------- TensorRT build side


def test_dla_is_gated_by_tensorrt_version(fake_trt, tmp_path):
    from gslim.export.tensorrt import build_engine, check_dla_support

    check_dla_support(10, 0)
    check_dla_support(11, None)
    with pytest.raises(GslimError, match="TensorRT 11.x does not support DLA"):
        check_dla_support(11, 0)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    fake_trt(11)
    with pytest.raises(GslimError, match="does not support DLA"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="fp16", dla_core=0)


def test_one_shared_logger_filters_by_severity(fake_trt):
    from gslim.runtime.tensorrt import trt_logger as _logger

    trt = fake_trt(10)
    log = _logger(trt)
    assert _logger(trt) is log  # builds, runners and the profiler share it
    sev = trt.ILogger.Severity
    since = log.mark()
    log.log(sev.VERBOSE, "noise")
    log.log(sev.INFO, "noise")
    log.log(sev.WARNING, "careful")
    assert log.first_error("build failed", since).startswith("build failed (TensorRT reported no error")
    log.log(sev.ERROR, "\n  [network.cpp] real cause\nmore")
    assert log.first_error("build failed", since) == "[network.cpp] real cause"
    assert "noise" not in " ".join(log.warnings + log.errors) and "careful" in log.warnings


@pytest.fixture
def fake_trt(monkeypatch):
    import gslim.export.tensorrt as T
    from test_export import _fake_tensorrt

    def install(major: int):
        trt = _fake_tensorrt(major)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(T, "require_cuda", lambda: None)
        monkeypatch.setattr(T, "_device_name", lambda: "stand-in GPU")
        return trt

    return install


def test_int8_static_batch_larger_than_the_calibration_set_is_refused(tmp_path):
    import torchvision

    from gslim.export.int8 import quantize_int8
    from gslim.export.onnx import export_onnx

    path = tmp_path / "static.onnx"
    export_onnx(
        torchvision.models.mobilenet_v2(num_classes=4).eval(),
        32,
        path,
        opset=17,
        dynamic_batch=False,
        batch=8,
    )
    with pytest.raises(GslimError, match="static batch of 8 but only 4 calibration images"):
        quantize_int8(path, tmp_path / "q.onnx", torch.zeros(4, 3, 32, 32))
    assert not (tmp_path / "q.onnx").exists()


# --------------------------------------------------------------------------- measurement context

SMI = "NVIDIA H200, 570.124.06, 1980, 1980, 3201, 3201, 1980, 700.00, 121.50, Enabled, 0x0000000000000000\n"


def test_nvidia_smi_context_is_parsed_and_unlocked_clocks_warned():
    from gslim.profiling.gpu_context import nvidia_smi

    info = nvidia_smi(0, lambda cmd: SMI)
    assert info["gpu"] == "NVIDIA H200" and info["power_limit_w"] == 700.0 and info["clocks_pinned"]
    assert not info["notes"]
    idle = SMI.replace("1980, 1980, 3201, 3201, 1980", "345, 1980, 3201, 3201, 1755")
    info = nvidia_smi(0, lambda cmd: idle)
    assert not info["clocks_pinned"] and "not locked" in info["notes"][0]

    calls = []

    def old_driver(cmd):  # R5xx before 535: only the throttle-reason field names exist
        calls.append(cmd)
        return None if any("clocks_event_reasons" in c for c in cmd) else SMI

    assert nvidia_smi(0, old_driver)["available"] and "clocks_throttle_reasons" in calls[-1][2]
    assert not nvidia_smi(0, lambda cmd: None)["available"]


def test_jetson_power_mode_is_read_from_the_system(tmp_path):
    from gslim.profiling.gpu_context import jetson_state

    assert jetson_state(lambda cmd: "x", root=tmp_path) is None  # not a Jetson
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")
    answers = {"nvpmodel": "NV Power Mode: MAXN\n0\n", "jetson_clocks": None}
    state = jetson_state(lambda cmd: answers[cmd[0]], root=tmp_path)
    assert state["nvpmodel"] == ["NV Power Mode: MAXN", "0"] and state["l4t_release"].startswith("# R36")
    assert state["jetson_clocks"] is None and "needs root" in state["notes"][0]


# --------------------------------------------------------------------------- image and device check


def test_dockerfile_checks_the_gpu_stack_at_build_time():
    text = (ROOT / "Dockerfile").read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "pip list --format=freeze" in body and "pip freeze" not in body  # the pin cannot be silently empty
    assert "no tensorrt Python package to pin" in body
    assert "ARG ORT_GPU_VERSION=" in body and '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in body
    for lib in ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"):
        assert lib in body
    assert "ldd " in body and "not found" in body and "libnvinfer" in body and "tensorrt.__version__" in body


@pytest.mark.slow
def test_device_check_dry_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--dry", "--archs", "mobilenet_v2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "device_check.json").read_text())
    assert {
        "context",
        "build mobilenet_v2",
        "select mobilenet_v2",
        "profile mobilenet_v2",
        "latency mobilenet_v2",
        "finetune mobilenet_v2",
        "cpu agreement mobilenet_v2",
        "latency budget",
    } == set(results)
    assert all(r["status"] == "ok" for r in results.values())
    assert results["select mobilenet_v2"]["result"]["macs_fraction"] <= 0.5
    assert results["latency mobilenet_v2"]["result"][0]["speedup"] > 0
    assert results["profile mobilenet_v2"]["result"]["top_tottime"][0]["tottime"] > 0
    assert results["cpu agreement mobilenet_v2"]["result"]["units"] > 0
    runs = results["latency budget"]["result"]["runs"]
    assert runs[0]["table_measured_now"] > 0 and runs[1]["table_measured_now"] == 0
    assert (out / "latency_table.json").is_file()
    assert "| mobilenet_v2 |" in (out / "device_check.md").read_text()
    assert "Selection profile, mobilenet_v2" in (out / "device_check.md").read_text()
    assert (out / "device_check.log").is_file()
