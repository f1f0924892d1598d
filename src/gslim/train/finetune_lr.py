"""The default learning rate of a fine-tune (``finetune.lr: auto``), derived from the base.

The fine-tune's peak lr is the base's training peak lr (from its checkpoint when gslim trained
it, else the recipe's train section; both at batch 256, scaled to the global batch) times
``FACTOR``. The gap between the start and the teacher on the held-out images is recorded with
it (the report shows it) but does not change it: a rule that lowered the lr for a start close to
its teacher (0.05x at a gap of 1 point or less, rising log-linearly to 0.5x at 20 points) was
measured on the demo's greedy models and lost to one factor: at 30% MACs the fine-tune gained
+0.46 (0.05x), +0.36 (0.2x) and +0.86 (0.5x) points on the test set, at 70% the low factors
lost the most (``benchmarks/finetune.py``; BENCHMARKS.md, "Fine-tuning"). The held-out
selection (:mod:`gslim.holdout`), not a small lr, is what keeps a fine-tune from ending below
its start.
"""

from __future__ import annotations

from typing import Any, Optional

from gslim.recipe import TrainConfig

FACTOR = 0.5  # of the base's peak lr


def is_auto(lr: Any) -> bool:
    return isinstance(lr, str) and lr == "auto"


def derive_finetune_lr(
    reference: Optional[dict],
    optimizer: str,
    start_top1: Optional[float],
    teacher_top1: Optional[float],
) -> dict[str, Any]:
    """The fine-tune's peak lr at batch 256 and how it was found (recorded in the run's files).

    ``reference`` is ``{"lr", "optimizer", "source"}`` of the base's training; without one, or
    when the base was trained with another optimizer (its lr is then on another scale), the
    default train section's lr for this optimizer stands in for it.
    """
    ref = dict(reference or {})
    if not ref.get("lr") or ref.get("optimizer", optimizer) != optimizer:
        default = TrainConfig(optimizer=optimizer)
        why_ref = (
            f"the base was trained with {ref['optimizer']}, the fine-tune uses {optimizer}"
            if ref.get("optimizer") not in (None, optimizer)
            else "the base's training lr is unknown"
        )
        ref = {"lr": default.lr if optimizer == "sgd" else 1e-3, "source": f"default ({why_ref})"}
    gap = None if start_top1 is None or teacher_top1 is None else float(teacher_top1) - float(start_top1)
    factor = FACTOR
    lr = float(ref["lr"]) * factor
    gap_text = (
        "unknown gap to the teacher" if gap is None else f"the start is {gap:+.2f} points from the teacher"
    )
    return {
        "lr": lr,
        "reference_lr": float(ref["lr"]),
        "reference_source": ref.get("source", "base checkpoint"),
        "gap_points": gap,
        "factor": factor,
        "why": f"{factor:.3g} x the base's {float(ref['lr']):.4g}; {gap_text}",
    }
