"""glibc's default handling of large blocks against gslim's (``gslim.host_memory``), interleaved.

    python benchmarks/host_memory.py --archs mobilenet_v2,resnet18,resnet50 --rounds 2

For each model and round, one child process per setting, the order reversed every other round:
``default`` (glibc as it starts), ``kept`` (:func:`gslim.host_memory.keep_freed_memory`, what
``GSLIM_HOST_MEMORY=keep`` makes the CLI apply at start), and each of them ``+huge``: PyTorch's
own switch ``THP_MEM_ALLOC_ENABLE=1`` (c10's CPU allocator aligns blocks of 2 MB and more to 2 MB
and marks them ``MADV_HUGEPAGE``), measured for #13 and not adopted (BENCHMARKS.md "Huge pages").
Each child: a forward pass over the
calibration images in batches of 64 (after a warm-up batch), one greedy ``compress_model`` (50%
MACs, the batch of 64), and ``--train-steps`` SGD steps of a batch of 32 (forward, backward,
update: the fine-tune's work; an evaluation batch of 64 after every tenth). Same images as
``selection_speed.py``. Prints, per model and setting, the median over rounds of each wall time,
the compress's system CPU seconds and minor page faults, and the child's peak resident memory;
then the ratio of the default's median to each other setting's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SETTINGS = ("default", "kept", "default+huge", "kept+huge")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "synthetic"])
    ap.add_argument("--child", nargs=2, metavar=("ARCH", "SETTING"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child(a: argparse.Namespace) -> dict:
    """One model under one setting, in this (fresh) process."""
    arch, setting = a.child
    from gslim.host_memory import keep_freed_memory

    applied = []
    if setting.endswith("+huge"):  # (set for this child by run_child, before Python started)
        applied.append("huge pages" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "no huge pages")
    if setting.startswith("kept"):
        applied.append(keep_freed_memory())
    from selection_speed import calibration, forward_seconds

    from gslim.compress.select import compress_model
    from gslim.models import build_architecture
    from gslim.recipe import CompressConfig

    torch.set_num_threads(a.threads)
    x, y, source = calibration(a.images, a.size, a.data)
    torch.manual_seed(0)
    model = build_architecture(arch, 1000).eval()
    forward = forward_seconds(model, x, a.batch)
    cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    slim = compress_model(model, a.size, x, y, cfg, seed=0, batch_size=a.batch).model
    greedy, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    train = _train_seconds(slim, x, y, a.train_steps)
    return {
        "applied": ", ".join(applied) or "default",
        "data": source,
        "forward_s": forward,
        "greedy_s": greedy,
        "greedy_system_s": r1.ru_stime - r0.ru_stime,
        "greedy_faults": r1.ru_minflt - r0.ru_minflt,
        "train_s": train,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _train_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Wall time of ``steps`` SGD steps on batches of 32 (after one untimed step), with an
    evaluation batch of 64 after every tenth (a fine-tune scores held-out images as it goes)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n = x.shape[0]
    picks = [torch.arange(i * 32, i * 32 + 32) % n for i in range(steps + 1)]  # (cycling a small set)
    batches = [(x[p], y[p]) for p in picks]
    t0 = 0.0
    for i, (xb, yb) in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if i % 10 == 0 and i > 0:
            model.eval()
            with torch.no_grad():
                model(x[torch.arange(64) % n])
            model.train()
    return time.perf_counter() - t0


def run_child(a: argparse.Namespace, arch: str, setting: str) -> dict:
    cmd = [sys.executable, __file__, "--child", arch, setting]
    cmd += ["--images", str(a.images), "--size", str(a.size), "--batch", str(a.batch)]
    cmd += ["--train-steps", str(a.train_steps), "--threads", str(a.threads), "--data", a.data]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", "GSLIM_HOST_MEMORY", "THP_MEM_ALLOC_ENABLE")
    }
    if setting.endswith("+huge"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"host_memory.py: {arch} under {setting} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


COLUMNS = ("forward_s", "greedy_s", "greedy_system_s", "greedy_faults", "train_s", "peak_rss_mb")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    print(
        f"{a.images} images at {a.size}x{a.size}, batch {a.batch}, 50% MACs, {a.threads} thread(s), "
        f"{a.train_steps} training steps of 32; median of {a.rounds} round(s), settings interleaved\n"
    )
    print(
        "| model | setting | forward s | greedy s | greedy system s | greedy page faults | train s | peak RSS MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for arch in a.archs.split(","):
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for r in range(a.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                runs[setting].append(run_child(a, arch, setting))
        med = {s: {c: statistics.median(run[c] for run in runs[s]) for c in COLUMNS} for s in SETTINGS}
        for s in SETTINGS:
            applied = runs[s][0]["applied"]
            label = (
                s if applied in ("default", "kept", "huge pages", "huge pages, kept") else f"{s} ({applied})"
            )
            m = med[s]
            print(
                f"| {arch} | {label} | {m['forward_s']:.2f} | {m['greedy_s']:.2f} | {m['greedy_system_s']:.1f} | "
                f"{m['greedy_faults']:,.0f} | {m['train_s']:.2f} | {m['peak_rss_mb']:.0f} |"
            )
        for s in SETTINGS[1:]:
            ratio = {
                c: med["default"][c] / max(med[s][c], 1e-9) for c in ("forward_s", "greedy_s", "train_s")
            }
            print(
                f"| {arch} | default / {s} | {ratio['forward_s']:.2f}x | {ratio['greedy_s']:.2f}x | | | "
                f"{ratio['train_s']:.2f}x | {med[s]['peak_rss_mb'] / med['default']['peak_rss_mb']:.2f} ({s}/default) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
