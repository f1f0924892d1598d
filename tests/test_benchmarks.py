"""Smoke runs of the benchmark scripts (benchmarks/compare.py --quick, selection_speed.py tiny)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TP = importlib.util.find_spec("torch_pruning") is not None
TP_REASON = "torch_pruning is not installed (pip install 'gslim[bench]'): Torch-Pruning rows are skipped"


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_compare_quick(tmp_path):
    out = tmp_path / "results"
    proc = _run(["benchmarks/compare.py", "--quick", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare_quick.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert {"greedy", "l1"} <= methods
    assert not report["failures"]
    for r in report["rows"]:
        assert 0 < r["macs_fraction"] <= 0.5 + 1e-9  # every method at or under the budget
        assert 0 <= r["one_shot_top1"] <= 100 and 0 <= r["finetuned_top1"] <= 100
        assert (out / "compare_quick" / "mobilenet_v2" / "50pct" / r["method"] / "model.onnx").is_file()
    lat = report["latency"]["mobilenet_v2/50%"]["models"]
    assert {"base", *methods} <= set(lat) and all(v["median_ms"] > 0 for v in lat.values())
    assert (out / "tradeoff_methods_quick.png").stat().st_size > 0
    assert "| greedy |" in proc.stdout and "one-shot top-1" in proc.stdout
    if HAS_TP:
        assert "tp-magnitude" in methods
    else:
        assert "tp-magnitude" in report["skipped_methods"]
        assert "torch_pruning is not installed" in proc.stdout
    # a rerun resumes from the per-method cache instead of recomputing
    again = _run(["benchmarks/compare.py", "--quick", "--out", str(out)], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "greedy: cached" in again.stderr


@pytest.mark.skipif(not HAS_TP, reason=TP_REASON)
def test_tp_prune_meets_budget():
    import torch
    import torchvision

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import tp_prune

    from gslim.models import count_macs_params

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    base, _ = count_macs_params(model, 32)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    pruned, info = tp_prune(model, "tp-taylor", 32, x, y, 0.5 * base, 8, 8)
    macs, _ = count_macs_params(pruned, 32)
    assert macs <= 0.5 * base and macs > 0.4 * base
    assert info["gradient_s"] > 0 and 0 < info["pruning_ratio"] < 0.95
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert all(p.grad is None for p in model.parameters())  # the base model is left untouched


def test_planning_blocks_tiny():
    """benchmarks/planning_blocks.py: the block paths take fewer steps than the exact one."""
    args = ["--archs", "mobilenet_v2", "--images", "16", "--size", "32", "--rounds", "1", "--shares", "0.25"]
    proc = _run(["benchmarks/planning_blocks.py", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        r.split("|")[2].strip(): r.split("|")
        for r in proc.stdout.splitlines()
        if r.startswith("| mobilenet_v2")
    }
    assert set(rows) == {"exact", "0.25"}
    assert int(rows["0.25"][4]) < int(rows["exact"][4])  # steps
    assert float(rows["exact"][5]) == 0.0  # (the exact path against itself)


def test_selection_dispatch_tiny():
    """benchmarks/selection_dispatch.py counts ops and host reads by the gslim function issuing them."""
    args = ["--archs", "mobilenet_v2", "--images", "8", "--size", "32"]
    proc = _run(["benchmarks/selection_dispatch.py", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = next(r for r in proc.stdout.splitlines() if r.startswith("| all |")).split("|")
    assert int(total[2].replace(",", "")) > 1000
    assert "compress/omp.py:add" in proc.stdout


def test_selection_profile_tiny():
    """benchmarks/selection_profile.py prints the selection's costliest functions and its host syncs."""
    args = ["--size", "32", "--images", "8", "--top", "5", "--threads", "1"]
    proc = _run(["benchmarks/selection_profile.py", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Selection profile, mobilenet_v2 on cpu" in proc.stdout and "0 host syncs" in proc.stdout
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ") and not r.startswith("| function")]
    assert len(rows) == 5 and all(float(r.split("|")[3]) >= 0 for r in rows)


def test_selection_phases_tiny():
    """benchmarks/selection_phases.py splits a selection into phases that add up to it."""
    args = ["--archs", "mobilenet_v2", "--images", "8", "--size", "32", "--threads", "1"]
    proc = _run(["benchmarks/selection_phases.py", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [
        c.strip()
        for c in next(r for r in proc.stdout.splitlines() if r.startswith("| mobilenet_v2")).split("|")
    ]
    rewritten_s, selection_s, passes, rewritten = (float(v) for v in row[3:7])
    planning, walk, knapsack = (float(v) for v in row[7:10])
    sums, omp, other = (float(v) for v in row[10:13])
    assert planning > 0 and walk > 0 and sums > 0 and omp > 0
    assert abs(planning + walk + knapsack - passes) < 0.05 * passes
    assert abs(2 + sums + omp + knapsack + other - passes) < 0.05 * passes
    assert rewritten_s > 0 and rewritten > 0 and selection_s > 0  # (a tiny run's seconds print as 0.01)
    kernel, peak_mb = float(row[13]), float(row[14])  # the memory columns: a process's own measures
    assert kernel >= 0 and peak_mb > 50


def test_selection_memory_tiny():
    """benchmarks/selection_memory.py meters the heap phase by phase: the planning pass and the
    walk's segments each get a row, the memory in use never exceeds the heap, a phase's peak is at
    least what is in use at its end, and the phases' growth adds up to the selection's."""
    args = ["--arch", "mobilenet_v2", "--images", "8", "--size", "32", "--threads", "1"]
    proc = _run(["benchmarks/selection_memory.py", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in proc.stdout.splitlines() if r.startswith("| ")]
    body = {r[0]: r[1:] for r in rows[1:]}  # (rows[0]: the header)
    assert "planning pass" in body and any(p.startswith("walk segment") for p in body)
    phases = [v for p, v in body.items() if p != "**selection**"]
    for seconds, kernel, _grew, pages, heap, in_use, free, peak in ((float(x) for x in v) for v in phases):
        assert min(seconds, kernel, pages) >= 0 and 0 <= in_use <= heap and peak >= in_use - 1
        assert abs(heap - in_use - free) <= 1  # (each rounded to a MB)
    total = body["**selection**"]
    assert abs(sum(float(v[2]) for v in phases) - float(total[2])) <= len(phases)
    assert float(total[7]) >= max(float(v[7]) for v in phases) - 1


def test_selection_speed_tiny(tmp_path):
    js = tmp_path / "speed.json"
    proc = _run(
        [
            "benchmarks/selection_speed.py",
            "--archs",
            "mobilenet_v2",
            "--images",
            "8",
            "--size",
            "32",
            "--data",
            "synthetic",
            "--methods",
            "greedy,greedy-loss",
            "--max-seconds",
            "5",
            "--json",
            str(js),
        ],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(js.read_text())["rows"][0]
    assert row["forward_s"] > 0 and row["greedy"]["seconds"] > 0
    assert row["greedy-loss"]["status"] in ("done", "cut") and row["greedy-loss"]["estimate_s"] > 0
    assert "| mobilenet_v2 |" in proc.stdout
    # by default timed with freed blocks kept (what GSLIM_HOST_MEMORY=keep makes the CLI do)
    if sys.platform.startswith("linux"):
        assert json.loads(js.read_text())["host_memory"] == "kept"


@pytest.mark.slow
def test_int8_quick(tmp_path):
    out = tmp_path / "results"
    proc = _run(["benchmarks/int8.py", "--quick", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "int8_quick.json").read_text())
    rows = report["archs"]["mobilenet_v2"]["rows"]
    assert {"base", "greedy 50%", "greedy 50% + fine-tune", "greedy 50% round_to 16"} == set(rows)
    for r in rows.values():
        assert 0 <= r["int8_top1"] <= 100 and r["fp32_ms"] > 0 and r["int8_ms"] > 0
    assert "| greedy 50% |" in proc.stdout and "VNNI" in proc.stdout


@pytest.mark.slow
def test_latency_budget_quick(tmp_path):
    """A row per MACs weight, each with its own weight; the cached rerun timed once per budget."""
    out = tmp_path / "results"
    args = ["benchmarks/latency_budget.py", "--part", "speed", "--quick", "--out", str(out)]
    proc = _run(args + ["--macs-weight", "0,0.1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quick" / "speed_quick.json").read_text())
    first, second = report["rows"]
    assert [first["macs_weight"], second["macs_weight"]] == [0.0, 0.1]
    assert first["second_s"] > 0 and second["second_s"] is None
    for row in (first, second):
        assert row["measured_ms"] > 0 and row["predicted_ms"] > 0 and 0 < row["macs_fraction"] <= 1
    assert first["measured_now_first"] > 0 and second["measured_now_first"] == 0  # the table is cached
    assert "| mobilenet_v3_small | 85% | 0.1 |" in proc.stdout and "latency round 1" in proc.stderr


@pytest.mark.slow
def test_latency_calibration_quick(tmp_path):
    """The three predictions of each planned model against its measurement, and their summary."""
    proc = _run(["benchmarks/latency_calibration.py", "--quick", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "quick" / "calibration_quick.json").read_text())["rows"]
    assert 0 < row["measured_fraction"] < 1.2 and {"depth_map", "stage_model", "mean"} <= set(row)
    assert "| mobilenet_v3_small | 70% | 1 |" in proc.stdout and "- mean: mean |error|" in proc.stdout


def test_latency_budget_refuses_bad_methods_and_weights():
    proc = _run(
        ["benchmarks/latency_budget.py", "--part", "accuracy", "--methods", "macs-greedy"], timeout=120
    )
    assert proc.returncode == 2 and "--methods: latency-greedy and any of" in proc.stderr
    proc = _run(["benchmarks/latency_budget.py", "--part", "speed", "--macs-weight", "0,x"], timeout=120)
    assert proc.returncode == 2 and "--macs-weight: numbers separated by commas" in proc.stderr


@pytest.mark.slow
def test_finetune_benchmark_quick(tmp_path):
    """benchmarks/finetune.py --quick: one row per (criterion, budget, variant), cached on rerun."""
    args = ["benchmarks/finetune.py", "--quick", "--out", str(tmp_path), "--budgets", "50%"]
    args += ["--criteria", "greedy", "--variants", "auto:lr=auto", "fixed:lr=0.01,holdout_confidence=0"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| greedy | 50% |")]
    assert [r.split("|")[3].strip() for r in rows] == ["auto", "fixed"]
    results = sorted((tmp_path / "quick" / "finetune").rglob("result.json"))
    assert len(results) == 2
    auto = json.loads(next(p for p in results if p.parent.name == "auto").read_text())
    assert auto["lr_rule"]["factor"] > 0 and auto["lr"] == auto["lr_rule"]["lr"]
    again = _run(args, timeout=300)
    assert again.returncode == 0 and "training the base" not in again.stderr
    assert [line for line in again.stdout.splitlines() if line.startswith("| greedy | 50% |")] == rows


@pytest.mark.slow
def test_finetune_streams_quick(tmp_path):
    """benchmarks/finetune_streams.py: a cell fine-tuned under both rules in a shifted image
    stream, one table row with its one-shot and both fine-tuned top-1s, and the summaries."""
    args = ["benchmarks/finetune_streams.py", "--out", str(tmp_path), "--streams", "1", "--quick"]
    args += ["--methods", "l1", "--budgets", "50%"]
    proc = _run(args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mobilenet_v2 | 50% | l1 | 1 |")]
    assert len(rows) == 1
    top1s = [float(c) for c in rows[0].strip(" |").split("|")[4:]]  # one-shot, today, now
    assert len(top1s) == 3 and all(0 <= t <= 100 for t in top1s)
    assert "now - today over 1 stream(s)" in proc.stdout
    for rule in ("today", "now"):
        assert (tmp_path / f"compare_quick-stream-{rule}1.json").is_file()


@pytest.mark.slow
def test_knapsack_speed_replays_real_allocations_with_the_same_widths():
    """benchmarks/knapsack_speed.py: the recorded allocations of a compress, replayed with both
    front merges, choose the same widths."""
    args = ["benchmarks/knapsack_speed.py", "--archs", "mobilenet_v2", "--budgets", "50%", "--repeats", "1"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mobilenet_v2 | 50% |"))
    cells = [c.strip() for c in row.strip(" |").split("|")]
    assert int(cells[3]) >= 1 and cells[-1] == "True"


def test_selection_batch_prints_a_row_per_batch():
    """benchmarks/selection_batch.py: one row per (model, batch) with the CPU time split."""
    args = ["benchmarks/selection_batch.py", "--archs", "mobilenet_v2", "--batches", "4,8"]
    args += ["--images", "8", "--size", "32", "--data", "synthetic", "--threads", "1"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mobilenet_v2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["4", "8"]
    assert all(float(r.split("|")[4]) > 0 for r in rows)


def test_host_memory_prints_every_setting_and_their_ratios():
    """benchmarks/host_memory.py: a row per setting from its own child process, then the ratios."""
    args = ["benchmarks/host_memory.py", "--archs", "mobilenet_v2", "--rounds", "1", "--images", "8"]
    args += ["--size", "32", "--batch", "8", "--train-steps", "1", "--data", "synthetic", "--threads", "1"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        line.split("|")[2].strip() for line in proc.stdout.splitlines() if line.startswith("| mobilenet_v2 |")
    ]
    settings = ["default", "kept", "default+huge", "kept+huge"]
    assert [r.split(" (")[0] for r in rows] == settings + [f"default / {s}" for s in settings[1:]]
    if sys.platform.startswith("linux"):  # glibc: the kept settings applied (no "(why not)")
        assert rows[1] == "kept"


def test_omp_precision_times_both_precisions_and_compares_their_units():
    """benchmarks/omp_precision.py: a row per model with both precisions' times and how their
    selections agree (the same model and images under both)."""
    args = ["benchmarks/omp_precision.py", "--archs", "mobilenet_v3_small", "--rounds", "2", "--images", "8"]
    args += ["--size", "32", "--data", "synthetic", "--threads", "1"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mobilenet_v3_small |"))
    cells = [c.strip() for c in row.strip(" |").split("|")]
    units = int(cells[5].split("/")[1])
    assert units > 0 and float(cells[4].rstrip("x")) > 0
    assert 0.0 <= float(cells[7]) <= 1.0


def test_statistics_sums_times_both_ways_of_each_sum_and_their_difference():
    """benchmarks/statistics_sums.py: a row per Gram width and per model, both timings, and how
    far the two results are apart (float rounding only)."""
    args = ["benchmarks/statistics_sums.py", "--widths", "64,520", "--archs", "mobilenet_v3_small"]
    args += ["--images", "16", "--size", "32", "--rounds", "1", "--threads", "1"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = ("| columns |", "| model |")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith(heads)]
    assert [r.split("|")[1].strip() for r in rows] == ["64", "520", "mobilenet_v3_small"]
    for r in rows:
        cells = [c.strip() for c in r.strip(" |").split("|")]
        assert float(cells[-2]) > 0
    # the same Gram either way; curves that agree but where a near-tie on 16 images moves a point
    assert float(rows[0].split("|")[-2]) < 1e-6 and float(rows[1].split("|")[-2]) < 1e-6
    assert float(rows[2].split("|")[-2]) < 0.5


def test_statistics_sums_refuses_an_unknown_part_with_argparse_error():
    proc = _run(["benchmarks/statistics_sums.py", "--part", "grams,nope"], timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        "--part: a comma-separated list of grams and planning (got 'grams,nope')"
        in proc.stderr.splitlines()[-1]
    )


def test_dense_stats_tiny():
    """benchmarks/dense_stats.py times the three ways on every shape it lists."""
    proc = _run(["benchmarks/dense_stats.py", "--images", "2", "--threads", "1"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ") and " ch, " in r]
    assert len(rows) == 4 and all(float(c) > 0 for r in rows for c in r.strip("| ").split("|")[1:])


def test_selection_memory_first_touch_times_each_fresh_gib():
    proc = _run(["benchmarks/selection_memory.py", "--first-touch", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r.split("|")[1:-1] for r in proc.stdout.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2]
    assert all(float(r[1]) >= 0 and float(r[2]) > 0 for r in rows)
