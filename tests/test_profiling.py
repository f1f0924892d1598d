"""gslim profile: statistics, interleaving, backends, skipping, report and CLI (CPU only, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gslim.errors import GslimError
from gslim.profiling import ArtifactSet
from gslim.profiling.measure import (
    MeasureSettings,
    Samples,
    measure_interleaved,
    percentile,
    round_order,
    speedup,
    summarize,
    top1_accuracy,
    warm_up,
)

TINY = dict(warmup_s=0.01, min_iters=4, min_seconds=0.0, rounds=2)


# ----------------------------------------------------------------------------- fixtures


def _export_onnx(model: torch.nn.Module, path: Path, size: int = 32, dynamic: bool = True) -> Path:
    import warnings

    x = torch.zeros(1, 3, size, size)
    kwargs = dict(dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}) if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), x, str(path), input_names=["input"], output_names=["logits"], dynamo=False, **kwargs
        )
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """base (mobilenet_v2) and a smaller stand-in 'compressed' (mobilenet_v3_small), each .pt + .onnx."""
    import gslim.models as gm

    d = tmp_path_factory.mktemp("artifacts")
    out = {}
    torch.manual_seed(0)
    for arch, stem in (("mobilenet_v2", "base"), ("mobilenet_v3_small", "slim")):
        m = gm.build_model(arch, 10)
        out[f"{stem}.pt"] = gm.save_checkpoint(m, gm.ModelSpec(arch, 10, 32), d / f"{stem}.pt")
        out[f"{stem}.onnx"] = _export_onnx(m, d / f"{stem}.onnx")
    return out


def _recipe(**profile):
    from gslim.recipe import load_recipe

    over = {
        "data.kind": "synthetic",
        "data.synthetic_val": 32,
        "data.batch_size": 16,
        "seed": 0,
        "profile.eval_images": 16,
    }
    over.update({f"profile.{k}": v for k, v in {**TINY, **profile}.items()})
    return load_recipe(None, over)


# ----------------------------------------------------------------------------- statistics


def test_percentile_interpolates_like_numpy():
    vals = [5.0, 1.0, 4.0, 2.0, 3.0]
    for p in (0, 10, 25, 50, 90, 95, 99, 100):
        assert percentile(vals, p) == pytest.approx(float(np.percentile(vals, p)))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_known_timings():
    s = summarize([i / 1000 for i in range(1, 11)], batch=4)  # 1..10 ms
    assert s["iters"] == 10
    assert s["median_ms"] == pytest.approx(5.5)
    assert s["mean_ms"] == pytest.approx(5.5)
    assert s["p90_ms"] == pytest.approx(9.1)
    assert s["p95_ms"] == pytest.approx(9.55)
    assert s["p99_ms"] == pytest.approx(9.91)
    assert (s["min_ms"], s["max_ms"]) == pytest.approx((1.0, 10.0))
    assert s["std_ms"] == pytest.approx(float(np.std(np.arange(1, 11), ddof=1)))
    assert s["cv"] == pytest.approx(s["std_ms"] / 5.5)
    assert s["throughput"] == pytest.approx(4 / 0.0055)  # images/s at the median
    assert s["noisy"] is True  # cv ~ 0.55

    steady = summarize([0.002] * 20 + [0.0021] * 5, batch=1)
    assert steady["median_ms"] == pytest.approx(2.0)
    assert steady["cv"] < 0.1 and steady["noisy"] is False
    one = summarize([0.003])
    assert one["std_ms"] == 0.0 and one["cv"] == 0.0 and one["p99_ms"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        summarize([])


def test_speedup_pooled_and_per_round():
    base, comp = Samples(), Samples()
    for r, (b, c) in enumerate([(2.0, 1.0), (2.2, 1.0), (2.4, 1.2)]):
        for _ in range(3):
            base.add(b, None, r)
            comp.add(c, None, r)
    s = speedup(base, comp)
    assert s["speedup"] == pytest.approx(2.2 / 1.0)
    assert s["speedup_round_min"] == pytest.approx(2.0)
    assert s["speedup_round_max"] == pytest.approx(2.2)
    assert s["rounds"] == 3


# ----------------------------------------------------------------------------- interleaving


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Takes ``latency`` fake seconds per run and logs every call into a shared list."""

    def __init__(self, name: str, latency: float, clock: FakeClock, log: list[str], e2e_extra=None):
        self.name, self.latency, self.clock, self.log, self.e2e_extra = name, latency, clock, log, e2e_extra

    def sample(self, clock):
        assert clock is self.clock  # the injected clock is the one used
        t0 = clock()
        self.clock.now += self.latency
        self.log.append(self.name)
        e2e = None if self.e2e_extra is None else self.latency + self.e2e_extra
        return clock() - t0, e2e


def test_round_order_alternates():
    assert [round_order(["a", "b", "c"], r) for r in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def test_warm_up_is_time_based():
    clock, log = FakeClock(), []
    iters, elapsed = warm_up(FakeRunner("a", 0.01, clock, log), 0.045, clock)
    assert iters == 5 and elapsed == pytest.approx(0.05)
    iters, _ = warm_up(FakeRunner("b", 0.01, clock, log), 0.0, clock)
    assert iters == 1  # always at least one


def test_interleaving_order_and_counts_with_fake_clock():
    clock, log = FakeClock(), []
    runners = {"base": FakeRunner("B", 0.010, clock, log), "slim": FakeRunner("S", 0.005, clock, log)}
    settings = MeasureSettings(warmup_s=0.02, min_iters=6, min_seconds=0.0, rounds=3, settle_iters=1)
    rounds_seen = []
    out = measure_interleaved(
        runners, settings, clock=clock, on_round=lambda d, t: rounds_seen.append((d, t))
    )
    # warm-up: base 2 runs (0.02 s), slim 4 runs; then rounds of settle + 2 timed runs, order alternating
    expected = ["B"] * 2 + ["S"] * 4
    expected += ["B"] * 3 + ["S"] * 3  # round 0: base first
    expected += ["S"] * 3 + ["B"] * 3  # round 1: reversed
    expected += ["B"] * 3 + ["S"] * 3  # round 2
    assert log == expected
    assert rounds_seen == [(1, 3), (2, 3), (3, 3)]
    assert out["base"].round_index == [0, 0, 1, 1, 2, 2]
    assert out["base"].primary == pytest.approx([0.010] * 6)
    assert out["slim"].primary == pytest.approx([0.005] * 6)
    assert (out["base"].warmup_iters, out["slim"].warmup_iters) == (2, 4)
    assert out["base"].e2e == []  # CPU-style runners have no end-to-end figure
    assert speedup(out["base"], out["slim"])["speedup"] == pytest.approx(2.0)


def test_min_seconds_and_min_iters_both_hold():
    clock, log = FakeClock(), []
    runners = {
        "a": FakeRunner("a", 0.01, clock, log, e2e_extra=0.002),
        "b": FakeRunner("b", 0.04, clock, log, e2e_extra=0.002),
    }
    settings = MeasureSettings(warmup_s=0.0, min_iters=4, min_seconds=0.3, rounds=3, settle_iters=0)
    out = measure_interleaved(runners, settings, clock=clock)
    # 0.1 s per round per model: a needs 10 runs a round, b needs 3 (>= ceil(4/3) = 2)
    assert len(out["a"].primary) == 30 and len(out["b"].primary) == 9
    for s in out.values():
        assert len(s.primary) >= 4 and s.timed_s >= 0.3 - 1e-9
        assert s.e2e == pytest.approx([t + 0.002 for t in s.primary])


def test_top1_accuracy_counts_and_limit():
    logits = lambda x: np.eye(3)[np.asarray(x).astype(int).ravel()]  # noqa: E731 - predicts the input value
    batches = [(np.array([0, 1, 2]), np.array([0, 1, 0])), (np.array([2, 2]), np.array([2, 1]))]
    assert top1_accuracy(logits, batches) == (pytest.approx(3 / 5), 5)
    assert top1_accuracy(logits, batches, limit=4) == (pytest.approx(3 / 4), 4)


# ----------------------------------------------------------------------------- backends


def test_missing_backends_report_reasons():
    from gslim.runtime import BACKENDS, availability

    avail = availability()
    assert set(avail) == {"torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", "ort-trt", "trt"}
    assert avail["torch-cpu"] == (True, "") and avail["ort-cpu"] == (True, "")
    for name in ("torch-cuda", "ort-cuda", "ort-trt", "trt"):
        ok, reason = avail[name]
        if ok:
            continue  # a GPU machine: nothing to assert about skipping
        assert reason and "\n" not in reason
    if not torch.cuda.is_available():
        assert "CUDA" in avail["torch-cuda"][1]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "tensorrt is not installed" in avail["trt"][1]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in avail["ort-cuda"][1]
    assert BACKENDS["trt"].artifact == "engine" and BACKENDS["ort-cuda"].artifact == "onnx"


def test_unavailable_backend_refuses_to_activate(artifacts):
    from gslim.runtime import BACKENDS, BackendUnavailable

    for name in ("torch-cuda", "trt"):
        cls = BACKENDS[name]
        if cls.available()[0]:
            continue
        path = artifacts["base.pt"] if cls.artifact == "pt" else artifacts["base.onnx"]
        with pytest.raises(BackendUnavailable, match=name):
            with cls(path):
                pass


def test_torch_and_ort_cpu_agree_and_restore_threads(artifacts):
    from gslim.runtime import BackendOptions, OrtCPU, TorchCPU

    before = torch.get_num_threads()
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    opts = BackendOptions(threads=1)
    with TorchCPU(artifacts["base.pt"], opts) as tb:
        assert torch.get_num_threads() == 1
        ref = tb.infer(torch.from_numpy(x))
        tb.prepare(2)
        primary, e2e = tb.sample(__import__("time").perf_counter)
        assert primary > 0 and e2e is None
        assert tb.describe()["device"]["threads"] == 1
    assert torch.get_num_threads() == before
    with OrtCPU(artifacts["base.onnx"], opts) as ob:
        assert ob.input_hw is None or ob.input_hw == (32, 32)
        out = ob.infer(x)
        ob.prepare(2)
        ob.run()
        d = ob.describe()
        assert d["runtime"]["providers"][0] == "CPUExecutionProvider"
        assert d["options"]["intra_op_num_threads"] == 1 and d["precision"] == "fp32"
    assert ref.shape == out.shape == (3, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


def test_fixed_batch_onnx_pads_for_accuracy_and_skips_other_batches(tmp_path):
    from gslim.runtime import BatchUnsupported, OrtCPU

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)
    )
    path = _export_onnx(net, tmp_path / "fixed.onnx", size=16, dynamic=False)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    with OrtCPU(path) as b:
        assert b.fixed_batch == 1 and b.input_hw == (16, 16)
        out = b.infer(x)
        b.prepare(1)
        with pytest.raises(BatchUnsupported, match="fixed batch of 1"):
            b.prepare(4)
    with torch.no_grad():
        np.testing.assert_allclose(out, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_deactivate_runs_when_activate_fails(tmp_path):
    from gslim.runtime import Backend

    calls = []

    class Broken(Backend):
        name = "broken"

        def activate(self):
            calls.append("activate")
            raise GslimError("boom")

        def deactivate(self):
            calls.append("deactivate")

    p = tmp_path / "m.pt"
    p.write_bytes(b"x")
    with pytest.raises(GslimError, match="boom"):
        with Broken(p):
            pass
    assert calls == ["activate", "deactivate"]


# ----------------------------------------------------------------------------- grouping


def test_group_artifacts_by_stem_and_base(tmp_path, artifacts):
    from gslim.commands.profile import group_artifacts

    sets = group_artifacts([artifacts["base.pt"], artifacts["slim.pt"], artifacts["base.onnx"]])
    assert [(s.label, s.role) for s in sets] == [("base", "base"), ("slim", "compressed")]
    assert sets[0].onnx == artifacts["base.onnx"] and sets[1].onnx is None
    by_label = group_artifacts([artifacts["base.pt"], artifacts["slim.pt"]], base="slim")
    assert [(s.label, s.role) for s in by_label] == [("slim", "base"), ("base", "compressed")]
    by_index = group_artifacts([artifacts["base.pt"], artifacts["slim.pt"]], base="1")
    assert by_index[0].label == "slim"
    with pytest.raises(GslimError, match="names no artifact"):
        group_artifacts([artifacts["base.pt"]], base="nope")
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"0")
    with pytest.raises(GslimError, match="unsupported artifact"):
        group_artifacts([bad])
    with pytest.raises(GslimError, match="not found"):
        group_artifacts([tmp_path / "missing.pt"])


# ----------------------------------------------------------------------------- report


def _fake_report(tmp_path: Path) -> dict:
    def res(label, role, med, sp=None, backend="ort-cpu", batch=1):
        lat = summarize([med / 1e3 * f for f in (0.98, 1.0, 1.0, 1.02, 1.05)], batch)
        return {
            "backend": backend,
            "batch": batch,
            "label": label,
            "role": role,
            "status": "ok",
            "reason": None,
            "precision": "fp32",
            "device": {"kind": "cpu", "cpu": "Test CPU", "threads": 1},
            "runtime": {"name": "onnxruntime", "version": "1"},
            "notes": [],
            "latency_ms": lat,
            "e2e_ms": None,
            "throughput": lat["throughput"],
            "noisy": lat["noisy"],
            "speedup": sp,
            "speedup_round_min": sp and sp - 0.1,
            "speedup_round_max": sp and sp + 0.1,
            "speedup_rounds": 3 if sp else 0,
        }

    results = [
        res("base", "base", 10.0),
        res("greedy 70%", "compressed", 7.0, 10 / 7),
        res("greedy 50%", "compressed", 5.0, 2.0),
        res("greedy 30%", "compressed", 3.2, 10 / 3.2),
        {
            "backend": "trt",
            "batch": 1,
            "label": "base",
            "role": "base",
            "status": "skipped",
            "reason": "tensorrt is not installed",
        },
    ]
    accuracy = [
        {"backend": "ort-cpu", "label": lb, "top1": t, "images": 100, "reason": None}
        for lb, t in (("base", 0.91), ("greedy 70%", 0.905), ("greedy 50%", 0.89), ("greedy 30%", 0.85))
    ]
    return {
        "created": "now",
        "gslim": "0",
        "environment": {"cpu": "Test CPU", "cpu_count": 2},
        "settings": {
            "threads": 1,
            "batch_sizes": [1],
            "warmup_s": 1,
            "min_iters": 50,
            "min_seconds": 2,
            "rounds": 5,
            "cv_warn": 0.1,
        },
        "eval_images": 100,
        "data": "synthetic",
        "artifacts": [
            {
                "label": "base",
                "role": "base",
                "arch": "mobilenet_v2",
                "macs": 300e6,
                "params": 3.5e6,
                "files": {"onnx": "base.onnx"},
                "file_sizes": {"onnx": 14_000_000},
                "extra": {},
            }
        ],
        "results": results,
        "accuracy": accuracy,
        "warnings": [],
        "paths": {"report_md": str(tmp_path / "report.md"), "plot": str(tmp_path / "tradeoff.png")},
    }


def test_render_markdown_and_plot_from_report_dict(tmp_path):
    from gslim.profiling.report import plot_tradeoff, render_markdown

    report = _fake_report(tmp_path)
    md = render_markdown(report)
    assert "| base | base | mobilenet_v2 | 300 M | 3.5 M |" in md
    assert "2.00× (1.90–2.10)" in md and "1.00× (base)" in md
    assert "91.00%" in md and "### ort-cpu · batch 1" in md
    assert "**trt** skipped" in md and "tensorrt is not installed" in md
    png = plot_tradeoff(report, tmp_path / "tradeoff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report["results"] = [r for r in report["results"] if r["status"] != "ok"]
    plot_tradeoff(report, tmp_path / "empty.png")  # nothing measured still draws a figure
    assert "Nothing was measured" in render_markdown(report)


def test_profile_stage_writes_reports_and_skips_missing(tmp_path, artifacts):
    from gslim.profiling.stage import profile_stage

    sets = [
        ArtifactSet("base", "base", artifacts["base.pt"], onnx=artifacts["base.onnx"]),
        ArtifactSet("greedy 50%", "compressed", artifacts["slim.pt"], extra={"budget": 0.5}),
    ]
    recipe = _recipe(backends=["torch-cpu", "ort-cpu", "torch-cuda", "ort-cuda", "trt"], batch_sizes=[1, 2])
    out = tmp_path / "prof"
    summary = profile_stage(sets, recipe, out, progress=False)

    for key in ("latency", "report_json", "report_md", "plot"):
        assert Path(summary["paths"][key]).is_file()
    report = json.loads((out / "report.json").read_text())
    latency = json.loads((out / "latency.json").read_text())
    ok = [r for r in report["results"] if r["status"] == "ok"]
    # torch-cpu: both models at both batches; ort-cpu: only base has an .onnx
    assert sorted((r["backend"], r["label"], r["batch"]) for r in ok) == sorted(
        [("torch-cpu", lb, b) for lb in ("base", "greedy 50%") for b in (1, 2)]
        + [("ort-cpu", "base", 1), ("ort-cpu", "base", 2)]
    )
    for r in ok:
        assert r["latency_ms"]["iters"] >= 4 and r["latency_ms"]["median_ms"] > 0
        assert r["device"]["kind"] == "cpu" and r["precision"] == "fp32" and r["runtime"]["version"]
        assert r["versions"]["torch"] and r["versions"]["onnxruntime"]
        assert "samples_ms" not in r  # raw samples live in latency.json
        if r["role"] == "compressed":
            assert r["speedup"] == pytest.approx(
                next(
                    b
                    for b in ok
                    if b["role"] == "base" and b["backend"] == r["backend"] and b["batch"] == r["batch"]
                )["latency_ms"]["median_ms"]
                / r["latency_ms"]["median_ms"]
            )
    raw = [r for r in latency["results"] if r["status"] == "ok"]
    assert all(len(r["samples_ms"]) == r["latency_ms"]["iters"] == len(r["round_index"]) for r in raw)
    assert set(raw[0]["round_index"]) == {0, 1}

    reasons = {(r["backend"], r["label"]): r["reason"] for r in report["results"] if r["status"] != "ok"}
    assert "no .onnx file" in reasons[("ort-cpu", "greedy 50%")]
    for name in ("torch-cuda", "ort-cuda", "trt"):
        if not __import__("gslim.runtime", fromlist=["x"]).BACKENDS[name].available()[0]:
            assert reasons[(name, "base")] and reasons[(name, "greedy 50%")]
    top1 = {(a["backend"], a["label"]): a["top1"] for a in report["accuracy"]}
    assert 0.0 <= top1[("torch-cpu", "base")] <= 1.0
    assert top1[("ort-cpu", "base")] == pytest.approx(top1[("torch-cpu", "base")])  # same images, same model
    assert report["eval_images"] == 16 and report["environment"]["torch"]
    arts = {a["label"]: a for a in report["artifacts"]}
    assert arts["base"]["macs"] > arts["greedy 50%"]["macs"] > 0 and arts["base"]["params"] > 0
    assert arts["greedy 50%"]["extra"] == {"budget": 0.5}

    md = (out / "report.md").read_text()
    assert "speedup vs base" in md and "greedy 50%" in md and "## Skipped" in md
    assert summary["measured"] == 6 and summary["results"][0]["median_ms"] is not None

    with pytest.raises(GslimError, match="--force"):
        profile_stage(sets, recipe, out, progress=False)


def test_broken_artifact_is_recorded_as_failed_not_fatal(tmp_path, artifacts, capsys):
    from gslim.profiling.stage import profile_stage

    broken = tmp_path / "base.onnx"
    broken.write_bytes(b"not an onnx file")
    sets = [ArtifactSet("base", "base", artifacts["base.pt"], onnx=broken)]
    summary = profile_stage(sets, _recipe(backends=["torch-cpu", "ort-cpu"]), tmp_path / "out", progress=True)
    status = {r["backend"]: (r["status"], r["reason"]) for r in summary["results"]}
    assert status["torch-cpu"] == ("ok", None)
    assert status["ort-cpu"][0] == "failed" and "base.onnx" in status["ort-cpu"][1]
    assert any("ort-cpu" in w for w in summary["warnings"])
    assert "warning:" in capsys.readouterr().err  # printed, not only recorded


def test_cli_end_to_end_and_refuses_overwrite(tmp_path, artifacts, capsys):
    from gslim.cli import main

    out = tmp_path / "cli"
    argv = [
        "profile",
        str(artifacts["base.pt"]),
        str(artifacts["base.onnx"]),
        str(artifacts["slim.pt"]),
        str(artifacts["slim.onnx"]),
        "--set",
        "data.kind=synthetic",
        "--set",
        "data.synthetic_val=16",
        "--backend",
        "torch-cpu",
        "--backend",
        "ort-cpu",
        "--batch",
        "1",
        "--threads",
        "1",
        "--warmup-s",
        "0.01",
        "--min-iters",
        "2",
        "--min-seconds",
        "0",
        "--rounds",
        "2",
        "--eval-images",
        "8",
        "--out-dir",
        str(out),
        "--quiet",
    ]
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "report.md" in captured.out and "ort-cpu" in captured.out
    report = json.loads((out / "report.json").read_text())
    ok = {(r["backend"], r["label"]) for r in report["results"] if r["status"] == "ok"}
    assert ok == {("torch-cpu", "base"), ("torch-cpu", "slim"), ("ort-cpu", "base"), ("ort-cpu", "slim")}
    assert report["settings"]["min_iters"] == 2 and report["settings"]["threads"] == 1

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "already holds a finished" in err and "--force" in err and len(err.strip().splitlines()) == 1

    with pytest.raises(SystemExit) as e:
        main(argv[:1] + [str(artifacts["base.pt"]), "--backend", "nope", "--out-dir", str(out)])
    assert e.value.code != 0 and "unknown backend 'nope'" in capsys.readouterr().err


def test_cli_help_documents_every_option():
    from typer.testing import CliRunner

    from gslim.cli import app

    res = CliRunner().invoke(app, ["profile", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in (
        "--recipe",
        "--set",
        "--backend",
        "--batch",
        "--threads",
        "--warmup-s",
        "--min-iters",
        "--min-seconds",
        "--rounds",
        "--fp16",
        "--eval-images",
        "--out-dir",
        "--force",
        "--base",
    ):
        assert opt in res.output
