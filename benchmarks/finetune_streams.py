"""One compare.py cell fine-tuned under two rules over several image streams (#16).

    python benchmarks/finetune_streams.py --out /tmp/cmp --archs resnet18 --budgets 50% \
        --methods tp-magnitude --streams 0,1,2,3,4

A fine-tune's outcome depends on which images it happens to see: compare.py's fine-tune is a few
thousand images (16-32 steps), and its image order comes from the recipe's seed, which also fixes
the held-out slice the base was trained without. To tell a rule from the luck of one image order,
this script runs the same cell (same base, same one-shot model, same held-out slice) once per
*stream*: stream ``s`` shifts the seed of the fine-tune's sampler (which images, in which order)
and of every epoch's randomness (augmentation, the probes' batches) by ``s``, and nothing else.
Stream 0 is compare.py as it is.

Two rules, each a child ``compare.py`` process per stream (a stream's two side by side) (``--tag <rule><s>``, so its results
are cached in ``--out`` and a rerun resumes):

* ``today``: the fine-tune when #16 was filed: lr 0.04, distillation alpha 0.7 / T 2, any held-out
  gain on a 2,000-image slice;
* ``now``: the recipe's defaults (lr chosen by the held-out probe, the paired test, 5,000 images).

Prints one markdown row per stream (the one-shot top-1 and each rule's fine-tuned top-1), how
many streams ended below the one-shot model, and the mean and median of ``now - today``. The remaining
arguments go to compare.py unchanged (defaults: ``--base-epochs 1 --val-images 10000 --threads 1
--latency-seconds 0.2 --latency-rounds 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = {
    "today": [
        "--finetune-lr",
        "0.04",
        "--finetune-set",
        "holdout_confidence=0",
        "--finetune-set",
        "distill={alpha: 0.7, temperature: 2.0}",
        "--finetune-set",
        "holdout_images=2000",
    ],
    "now": [],
}
DEFAULTS = [
    "--base-epochs",
    "1",
    "--val-images",
    "10000",
    "--threads",
    "1",
    "--latency-seconds",
    "0.2",
    "--latency-rounds",
    "1",
]


def _child(stream: int, compare_args: list[str]) -> int:
    """compare.py in this process with the fine-tune's image stream shifted by ``stream``."""
    from torch.utils.data.distributed import DistributedSampler

    import gslim.train.distributed as distributed
    import gslim.train.finetune_lr as finetune_lr
    import gslim.train.loop as loop

    plain_epoch_seed = distributed.epoch_seed

    def shifted_epoch_seed(seed: int, epoch: int, rank: int) -> int:
        return plain_epoch_seed(seed + stream, epoch, rank)

    class ShiftedSampler(DistributedSampler):
        def __init__(self, *args, seed: int = 0, **kwargs):
            super().__init__(*args, seed=seed + stream, **kwargs)

    # the two names the fine-tune reads them by; the held-out split keeps the recipe's seed. A
    # rename there would leave the stream unshifted without an error: check they are still read.
    for module, name in ((loop, "epoch_seed"), (finetune_lr, "epoch_seed"), (loop, "DistributedSampler")):
        if not hasattr(module, name):
            raise SystemExit(f"{module.__name__}.{name} is gone: update benchmarks/finetune_streams.py")
    loop.epoch_seed = finetune_lr.epoch_seed = shifted_epoch_seed
    loop.DistributedSampler = ShiftedSampler
    sys.path.insert(0, str(HERE))
    import compare

    return compare.main(compare_args)


def _top1s(out: Path, tag: str, quick: bool) -> dict[tuple[str, str, str], dict]:
    data = json.loads((out / f"compare{'_quick' if quick else ''}-{tag}.json").read_text())
    return {(r["arch"], r["budget"], r["method"]): r for r in data["rows"] if "finetuned_top1" in r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--streams", default="0,1,2,3,4", help="stream shifts, comma-separated")
    ap.add_argument("--rules", default="today,now", help=f"subset of {','.join(RULES)}")
    ap.add_argument("--child-stream", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child_stream is not None:
        return _child(args.child_stream, ["--out", str(args.out)] + rest)
    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"unknown rule(s) {unknown}; known: {list(RULES)}")
    given = {a.split("=")[0] for a in rest if a.startswith("--")}
    defaults = [
        a for i in range(0, len(DEFAULTS), 2) if DEFAULTS[i] not in given for a in DEFAULTS[i : i + 2]
    ]
    rows: dict[tuple, dict[str, float]] = {}
    for s in streams:  # the rules of one stream run side by side (one process each)
        procs = {}
        for rule in rules:
            cmd = [sys.executable, __file__, "--child-stream", str(s), "--out", str(args.out)]
            cmd += defaults + rest + RULES[rule] + ["--tag", f"stream-{rule}{s}"]
            print(f"stream {s}, rule {rule}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            procs[rule] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=dict(os.environ))
        for rule, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"stream {s}, rule {rule}: compare.py exited with {proc.returncode}")
            for key, r in _top1s(args.out, f"stream-{rule}{s}", "--quick" in rest).items():
                row = rows.setdefault(key + (s,), {})
                row[rule] = r["finetuned_top1"]
                row["one-shot"] = r["one_shot_top1"]  # the same model under every rule
    print(f"| model | budget | method | stream | one-shot | {' | '.join(rules)} |")
    print("|---|---|---|---:|---:|" + "---:|" * len(rules))
    diffs: dict[tuple, list[float]] = {}
    for (arch, budget, method, s), top1 in sorted(rows.items()):
        print(
            f"| {arch} | {budget} | {method} | {s} | "
            + " | ".join(f"{top1.get(r, float('nan')):.2f}" for r in ["one-shot", *rules])
            + " |"
        )
        if "today" in top1 and "now" in top1:
            diffs.setdefault((arch, budget, method), []).append(top1["now"] - top1["today"])
    below: dict[tuple, list[int]] = {}  # streams whose fine-tune ended below its one-shot model
    for (arch, budget, method, _stream), top1 in rows.items():
        for r in rules:
            if r in top1:
                below.setdefault((arch, budget, method, r), []).append(int(top1[r] < top1["one-shot"]))
    for (arch, budget, method, r), b in sorted(below.items()):
        print(
            f"\n{arch} {budget} {method}, {r}: below its one-shot in {sum(b)} of {len(b)} stream(s)", end=""
        )
    print()
    for key, d in diffs.items():
        print(
            f"\n{' '.join(key)}: now - today over {len(d)} stream(s): mean {statistics.mean(d):+.2f}, "
            f"median {statistics.median(d):+.2f}, {sum(x >= 0 for x in d)} of {len(d)} >= 0"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
