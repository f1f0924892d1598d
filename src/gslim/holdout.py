"""Held-out model selection for fine-tuning: a fine-tune never ends below where it started.

A fine-tune of a compressed model starts close to the base (the greedy re-fit already lands
there) and a fixed learning rate can perturb it for the worse. So a seeded slice of the
*training* data is held out (never the validation set, which reports the result, and never
the calibration images compress selected and re-fitted on), the starting model is scored on
it, and so is each checkpoint during the fine-tune; the best one is kept, and the starting
model wins ties. The final artifact is therefore never worse on that slice than the model the
fine-tune started from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset

from gslim.data import eval_view, make_dataset, seeded_perm
from gslim.recipe import DataConfig


@dataclass
class HoldoutSplit:
    train: Dataset  # the training set without the held-out images
    holdout: Dataset  # the held-out images, without augmentation
    indices: list[int]  # their indices in the (possibly limited) training set
    calib_indices: list[int]  # the calibration subset they exclude


def holdout_split(
    data: DataConfig, input_size: int, num_classes: int, seed: int, count: int
) -> Optional[HoldoutSplit]:
    """Hold out up to ``count`` training images, disjoint from the calibration subset.

    The calibration subset is the first ``data.calib_images`` of the seeded permutation of the
    training set (:func:`gslim.data.calibration_loader`); the held-out images are the next
    ``count`` of the same permutation, so the two never overlap. At most a fifth of the
    training set is held out; None when nothing is left to hold out.
    """
    full = make_dataset(data, "train", input_size, num_classes, seed)
    n = len(full)
    perm = seeded_perm(n, seed).tolist()
    calib_n = min(data.calib_images, n)
    take = min(count, max(0, n - calib_n), n // 5)
    if take < 1:
        return None
    held = perm[calib_n : calib_n + take]
    held_set = set(held)
    rest = [i for i in range(n) if i not in held_set]
    return HoldoutSplit(
        train=Subset(full, rest),
        holdout=eval_view(Subset(full, held)),
        indices=held,
        calib_indices=perm[:calib_n],
    )


@dataclass
class BestKeeper:
    """The best checkpoint so far by held-out (top-1, then lower loss); the first offer (the
    starting model) wins ties, so a later one must be strictly better."""

    best: Optional[dict[str, Any]] = None  # {"epoch", "step", "holdout_top1", "holdout_loss"}
    state: Optional[dict[str, torch.Tensor]] = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def _key(point: dict[str, Any]) -> tuple[float, float]:
        return (float(point["holdout_top1"]), -float(point["holdout_loss"]))

    def offer(self, model: torch.nn.Module, point: dict[str, Any]) -> bool:
        """Record ``point`` (its scores and where it was taken); keep the model if it is best."""
        self.history.append(dict(point))
        if self.best is not None and self._key(point) <= self._key(self.best):
            return False
        self.best = dict(point)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)

    def to_state(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "model": self.state}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "BestKeeper":
        return cls(best=state.get("best"), state=state.get("model"), history=list(state.get("history") or []))

    def summary(self) -> dict[str, Any]:
        start = self.history[0] if self.history else None
        return {
            "kept": copy.deepcopy(self.best),
            "start": copy.deepcopy(start),
            "kept_start": bool(self.best and start and self.best["step"] == start["step"]),
            "points": len(self.history),
        }


def eval_steps(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """The steps (1-based, within an epoch) after which the held-out slice is scored; the
    epoch's last step is always one of them."""
    evals = max(1, min(evals_per_epoch, steps_per_epoch))
    return {round(steps_per_epoch * k / evals) for k in range(1, evals + 1)}
