"""How latency is measured, and the statistics reported.

The method follows trtexec: a time-based warm-up, then timed iterations until both a minimum
count and a minimum duration are reached; the report gives the median (the headline figure),
mean, p90/p95/p99, min, max, standard deviation, coefficient of variation (CV) and throughput.

Base and compressed models are *interleaved*: the same process times them in alternating
rounds (A B C, then C B A, ...), each round contributing ``min_iters / rounds`` iterations
and ``min_seconds / rounds`` seconds per model, and the samples are pooled per model. Slow
drifts of a shared machine (thermal state, a neighbour's job, frequency scaling) then hit
every model alike, so the speedup (base median / compressed median) is trustworthy even when
absolute numbers move. Each round starts with ``settle_iters`` untimed iterations so the
switch between models (cold caches) is not counted.

Everything here is pure Python over *runners* (anything with ``sample(clock)``) and an
injectable ``clock``, so the statistics and the interleaving order are unit-testable with
synthetic timings and a fake clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from gslim.errors import GslimError

CV_WARN = 0.10  # coefficient of variation above which a measurement is flagged as noisy

Clock = Callable[[], float]


class Runner(Protocol):
    """One model on one backend, staged with its input: ``sample`` runs one timed inference.

    Returns ``(primary_seconds, end_to_end_seconds or None)``: on a CPU the primary figure is
    the host wall time and there is no separate end-to-end figure; on a GPU the primary figure
    is device compute time (CUDA events) and end-to-end includes host↔device copies.
    """

    def sample(self, clock: Clock) -> tuple[float, Optional[float]]: ...


@dataclass
class MeasureSettings:
    warmup_s: float = 1.0
    min_iters: int = 50
    min_seconds: float = 2.0
    rounds: int = 5
    settle_iters: int = 1

    @classmethod
    def from_profile(cls, cfg: Any) -> "MeasureSettings":
        """From a :class:`gslim.recipe.ProfileConfig`."""
        return cls(
            warmup_s=cfg.warmup_s, min_iters=cfg.min_iters, min_seconds=cfg.min_seconds, rounds=cfg.rounds
        )

    def per_round(self) -> tuple[int, float]:
        """Iterations and seconds each model gets in each round (their sums reach the minimums)."""
        rounds = max(1, self.rounds)
        return max(1, math.ceil(self.min_iters / rounds)), self.min_seconds / rounds


@dataclass
class Samples:
    """Pooled timings (seconds) of one runner, with the round each sample came from."""

    primary: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    round_index: list[int] = field(default_factory=list)
    warmup_iters: int = 0
    warmup_s: float = 0.0
    timed_s: float = 0.0  # wall time spent in timed segments (clock), settle iterations excluded

    def add(self, primary: float, e2e: Optional[float], round_index: int) -> None:
        self.primary.append(float(primary))
        if e2e is not None:
            self.e2e.append(float(e2e))
        self.round_index.append(round_index)

    def in_round(self, r: int) -> list[float]:
        return [t for t, i in zip(self.primary, self.round_index, strict=True) if i == r]


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile with linear interpolation between closest ranks (numpy's default).

    ``percentile([1, 2, 3, 4], 50) == 2.5``; p=0 is the minimum and p=100 the maximum.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    s = sorted(values)
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    frac = pos - lo
    return s[lo] + (s[hi] - s[lo]) * frac


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summarize(values_s: Sequence[float], batch: int = 1, cv_warn: float = CV_WARN) -> dict[str, Any]:
    """Statistics of timings given in seconds, reported in milliseconds.

    ``std_ms`` is the sample standard deviation (n-1); ``cv = std / mean``; ``throughput`` is
    images per second at the median (``batch / median``); ``noisy`` is set when ``cv > cv_warn``.
    """
    n = len(values_s)
    if n == 0:
        raise ValueError("no timings to summarise")
    ms = [v * 1e3 for v in values_s]
    mean = sum(ms) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / (n - 1)) if n > 1 else 0.0
    med = median(ms)
    cv = std / mean if mean > 0 else 0.0
    return {
        "iters": n,
        "median_ms": med,
        "mean_ms": mean,
        "p90_ms": percentile(ms, 90),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "std_ms": std,
        "cv": cv,
        "throughput": (batch / (med / 1e3)) if med > 0 else math.inf,
        "noisy": cv > cv_warn,
    }


def speedup(base: Samples, other: Samples) -> dict[str, Any]:
    """Base median / other median over the pooled samples, with the spread over rounds.

    Per-round ratios compare medians taken in the same round (adjacent in time), so their
    range shows how stable the ratio is on this machine.
    """
    value = median(base.primary) / median(other.primary)
    ratios = []
    for r in sorted(set(base.round_index) & set(other.round_index)):
        b, o = base.in_round(r), other.in_round(r)
        if b and o:
            ratios.append(median(b) / median(o))
    return {
        "speedup": value,
        "speedup_round_min": min(ratios) if ratios else None,
        "speedup_round_max": max(ratios) if ratios else None,
        "rounds": len(ratios),
    }


# ----------------------------------------------------------------------------- timing loops


def round_order(keys: Sequence[str], round_index: int) -> list[str]:
    """Forward order in even rounds, reversed in odd rounds: A B C, C B A, A B C, ..."""
    keys = list(keys)
    return keys if round_index % 2 == 0 else keys[::-1]


def warm_up(runner: Runner, seconds: float, clock: Clock = time.perf_counter) -> tuple[int, float]:
    """Run until ``seconds`` of wall time have passed (at least one iteration)."""
    start = clock()
    iters = 0
    while True:
        runner.sample(clock)
        iters += 1
        elapsed = clock() - start
        if elapsed >= seconds:
            return iters, elapsed


def measure_interleaved(
    runners: Mapping[str, Runner],
    settings: MeasureSettings,
    clock: Clock = time.perf_counter,
    on_round: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Samples]:
    """Time every runner in alternating rounds; return pooled samples per runner key.

    Each runner is warmed up for ``warmup_s`` first (in order). Then, for ``rounds`` rounds,
    each runner in :func:`round_order` runs ``settle_iters`` untimed iterations and then timed
    iterations until it has done both ``ceil(min_iters / rounds)`` iterations and
    ``min_seconds / rounds`` seconds in this round. In total each runner therefore gets at
    least ``min_iters`` iterations and at least ``min_seconds`` of timed wall time.
    ``on_round(done, total)`` is called after every round (progress bars).
    """
    if not runners:
        return {}
    keys = list(runners)
    out = {k: Samples() for k in keys}
    for k in keys:
        out[k].warmup_iters, out[k].warmup_s = warm_up(runners[k], settings.warmup_s, clock)
    iters_per_round, seconds_per_round = settings.per_round()
    rounds = max(1, settings.rounds)
    for r in range(rounds):
        for k in round_order(keys, r):
            runner, acc = runners[k], out[k]
            for _ in range(settings.settle_iters):
                runner.sample(clock)
            start = clock()
            n = 0
            while True:
                primary, e2e = runner.sample(clock)
                acc.add(primary, e2e, r)
                n += 1
                elapsed = clock() - start
                if n >= iters_per_round and elapsed >= seconds_per_round:
                    break
            acc.timed_s += elapsed
        if on_round is not None:
            on_round(r + 1, rounds)
    return out


# ----------------------------------------------------------------------------- accuracy


def top1_accuracy(
    infer: Callable[[Any], Any],
    batches: Iterable[tuple[Any, Any]],
    limit: Optional[int] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[float, int]:
    """Top-1 accuracy of ``infer(images) -> logits`` over ``(images, labels)`` batches.

    Images may be torch tensors or numpy arrays; logits come back as numpy or torch. Returns
    ``(accuracy in [0, 1], images scored)``; stops after ``limit`` images.
    """
    import numpy as np

    correct = seen = 0
    for images, labels in batches:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(labels) > limit:
            keep = limit - seen
            images, labels = images[:keep], labels[:keep]
        logits = infer(images)
        logits = logits.detach().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
        labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        pred = logits.reshape(len(labels), -1).argmax(axis=1)
        correct += int((pred == labels).sum())
        seen += len(labels)
        if on_batch is not None:
            on_batch(len(labels))
    if seen == 0:
        raise GslimError("no images were scored (the validation set is empty)")
    return correct / seen, seen
