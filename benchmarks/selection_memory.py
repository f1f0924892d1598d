"""Where a greedy selection's host memory comes from: glibc's heap and the kernel's first touches,
phase by phase (the planning pass, each segment of the walk), in ``selection_phases.py``'s setting
(random weights, 1000 classes, 50% MACs, ``round_to`` 8, BatchNorm re-calibration off,
Fashion-MNIST images resized, host memory kept).

    python benchmarks/selection_memory.py [--arch resnet50] [--images 256] [--size 224] [--threads 2]
    python benchmarks/selection_memory.py --first-touch 6    # what a fresh GiB costs here, GiB by GiB

On a VM the kernel's time is mostly the first touch of pages the process had not used: each new
page is zeroed, and where the host backs it lazily that costs far more than a memset (on the
2-core VM, ``perf`` put it in ``clear_page_erms``; 0.5 to 7 s a GiB from run to run). With the
heap kept (``gslim.host_memory``), a page is new only when the heap grows, so the columns to read
are "heap grew" and "kernel s": the heap grows when no free block is large enough, which is set
by the peak of the memory in use *and* by how the free space is cut up ("free at end" is the
heap less what is in use: holes, and the free top the heap keeps).

Columns: seconds of the phase; its kernel seconds; the heap's growth (MB) and new pages touched
(MB, minor faults x page size); at the phase's end the heap, the memory in use in it and the
free space; the peak in use during the phase (sampled every 5 ms). Needs glibc >= 2.33
(``mallinfo2``).
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = resource.getpagesize()
MB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mallinfo2():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        raise SystemExit("this benchmark reads glibc's mallinfo2 (glibc >= 2.33)")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


class PhaseMeter:
    """The heap, the memory in use and the kernel's time at each phase boundary, and the peak in
    use between boundaries (a sampling thread)."""

    def __init__(self):
        self.info = _mallinfo2()
        self.rows: list[dict] = []
        self.label = "set-up"
        self.peak = 0
        self._mark = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _now(self) -> dict:
        usage, m = resource.getrusage(resource.RUSAGE_SELF), self.info()
        heap = m.arena + m.hblkhd  # (mmapped blocks too: none where the heap is kept)
        return {
            "t": time.perf_counter(),
            "kernel": usage.ru_stime,
            "faults": usage.ru_minflt,
            "heap": heap,
            "in use": m.uordblks + m.hblkhd,
        }

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            m = self.info()
            self.peak = max(self.peak, m.uordblks + m.hblkhd)

    def enter(self, label: str) -> None:
        """End the current phase and start ``label``."""
        now = self._now()
        self.peak = max(self.peak, now["in use"])
        before = self._mark
        self.rows.append(
            {
                "phase": self.label,
                "s": now["t"] - before["t"],
                "kernel s": now["kernel"] - before["kernel"],
                "heap grew": (now["heap"] - before["heap"]) / MB,
                "new pages": (now["faults"] - before["faults"]) * PAGE / MB,
                "heap": now["heap"] / MB,
                "in use": now["in use"] / MB,
                "free at end": (now["heap"] - now["in use"]) / MB,
                "peak in use": self.peak / MB,
            }
        )
        self.label, self._mark, self.peak = label, now, now["in use"]

    def close(self) -> None:
        self.enter("")
        self._stop.set()
        self._thread.join()


def measured_selection(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int) -> PhaseMeter:
    """One greedy selection of ``model`` with its phases metered."""
    import gslim.compress.segment_walk as segment_walk
    import gslim.compress.select as select
    from gslim.recipe import CompressConfig

    meter = PhaseMeter()
    planning, init, advance = (
        select.planning_curves,
        segment_walk.SegmentWalk.__init__,
        segment_walk.SegmentWalk.advance,
    )
    segments = [0]

    def metered_planning(*args, **kwargs):
        meter.enter("planning pass")
        try:
            return planning(*args, **kwargs)
        finally:
            meter.enter("walk set-up")

    def metered_init(self, *args, **kwargs):
        segments[0] += 1
        meter.enter(f"walk segment {segments[0]}")
        init(self, *args, **kwargs)

    def metered_advance(self):
        meter.enter(f"walk segment {segments[0]}: its outputs")
        try:
            return advance(self)
        finally:
            meter.enter(f"walk segment {segments[0]}: after")

    select.planning_curves = metered_planning
    segment_walk.SegmentWalk.__init__ = metered_init
    segment_walk.SegmentWalk.advance = metered_advance
    try:
        meter.enter("selection set-up")
        cfg = CompressConfig(criterion="greedy", target_macs=0.5, round_to=8, bn_recalib=False)
        select.compress_model(model, size, x, y, cfg, seed=0, batch_size=64)
        meter.enter("selection end")
    finally:
        select.planning_curves = planning
        segment_walk.SegmentWalk.__init__ = init
        segment_walk.SegmentWalk.advance = advance
        meter.close()
    return meter


def first_touch(gib: int) -> None:
    """Kernel and wall seconds of touching ``gib`` fresh GiB one after the other (kept: each is new
    to the process). On the 2-core VM the first few GiB cost ~0.3 s each and the rest 3-7 s: how
    many are cheap depends on what the machine freed shortly before (3 to 5 GiB in one hour)."""
    kept = []
    print("| GiB | kernel s | wall s |\n|---:|---:|---:|")
    for i in range(gib):
        k0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        kept.append(torch.ones(2**30 // 4))
        k1, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        print(f"| {i + 1} | {k1 - k0:.2f} | {t1 - t0:.2f} |", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-touch", type=int, metavar="GIB", help="only time touching GIB fresh GiB")
    a = ap.parse_args(argv)
    from gslim.host_memory import keep_freed_memory

    keep_freed_memory()  # first: before the images and the model exist (as selection_phases.py)
    torch.set_num_threads(a.threads)
    if a.first_touch:
        first_touch(a.first_touch)
        return 0
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    from selection_speed import calibration, forward_seconds

    from gslim.models import build_architecture

    x, y, desc = calibration(a.images, a.size, "auto")
    torch.manual_seed(0)
    model = build_architecture(a.arch, 1000).eval()
    fwd = forward_seconds(model, x)  # (as selection_phases.py: the heap has seen one pass)
    meter = measured_selection(model, x, y, a.size)
    rows = [r for r in meter.rows if r["phase"] not in ("set-up", "selection end", "")]
    print(f"{a.arch}: {a.images} images at {a.size} px ({desc}), 50% MACs, {a.threads} thread(s)")
    print(
        f"one plain forward pass {fwd:.2f} s; the heap before the selection {meter.rows[0]['heap']:.0f} MB\n"
    )
    cols = ["s", "kernel s", "heap grew", "new pages", "heap", "in use", "free at end", "peak in use"]
    print("| phase | " + " | ".join(c + (" MB" if c not in ("s", "kernel s") else "") for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    # phases of under 0.05 s that moved the heap by under 1 MB (bookkeeping between phases): one row
    short = [r for r in rows if r["s"] < 0.05 and abs(r["heap grew"]) < 1]
    shown = [r for r in rows if r not in short]
    if short:
        summed = {c: sum(r[c] for r in short) for c in ("s", "kernel s", "heap grew", "new pages")}
        last = max(short, key=lambda r: r["heap"])
        shown.append(
            {
                "phase": f"{len(short)} short phases",
                **summed,
                **{c: last[c] for c in ("heap", "in use", "free at end")},
                "peak in use": max(r["peak in use"] for r in short),
            }
        )
    for r in shown:
        print(
            f"| {r['phase']} | "
            + " | ".join(f"{r[c]:.2f}" if c in ("s", "kernel s") else f"{r[c]:.0f}" for c in cols)
            + " |"
        )
    total = {c: sum(r[c] for r in rows) for c in ("s", "kernel s", "heap grew", "new pages")}
    peak = max(r["peak in use"] for r in rows)
    print(
        f"| **selection** | {total['s']:.2f} | {total['kernel s']:.2f} | {total['heap grew']:.0f} | "
        f"{total['new pages']:.0f} | {rows[-1]['heap']:.0f} | | | {peak:.0f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
