"""What one training run holds (:class:`TrainRun`, set up by :mod:`.loop`) and what it returns."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from gslim.models import ModelSpec
from gslim.recipe import DataConfig, TrainConfig
from gslim.train.distributed import DistInfo, sync_buffers
from gslim.train.evaluate import evaluate
from gslim.train.selection import HoldoutRun


@dataclass
class TrainResult:
    final_path: Path
    epochs: int
    metrics: dict = field(default_factory=dict)  # last epoch's log line (val_top1, val_top5, ...)


@dataclass
class TrainRun:
    """Everything one training run holds, set up by :func:`_prepare`."""

    cfg: TrainConfig
    data: DataConfig
    spec: ModelSpec
    seed: int
    device: torch.device
    info: DistInfo
    run_dir: Path
    final_path: Path
    last_path: Path
    log_path: Path
    description: str
    progress: bool
    quiet: bool
    model: Any = None
    train_model: Any = None  # the model, or its DistributedDataParallel wrapper
    teacher: Any = None
    distill: Any = None
    optimizer: Any = None
    scaler: Any = None
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    sampler: Any = None
    train_loader: Any = None
    val_loader: Any = None
    split: Any = None  # the held-out slice of a fine-tune (None: keep the last checkpoint)
    holdout: Optional[HoldoutRun] = None
    holdout_state: Optional[dict] = None
    steps_per_epoch: int = 0
    peak_lr: float = 0.0
    lr_rule: Optional[dict] = None  # how an 'auto' fine-tuning lr was derived (also in last.pt)
    lr_reference: Optional[dict] = None  # the base's training lr and optimizer, for an 'auto' lr
    reserve_holdout: int = 0  # a base's training leaves out the fine-tune's held-out slice of this size
    total_steps: int = 0
    warmup_steps: int = 0
    signature: dict = field(default_factory=dict)
    start_epoch: int = 0
    step: int = 0
    metrics: dict = field(default_factory=dict)

    def say(self, msg: str) -> None:
        if self.info.is_main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def score(self, loader: DataLoader, per_image: bool = False) -> dict:
        sync_buffers(self.model, self.info)  # with rank 0's BatchNorm statistics, the ones that are saved
        return self.score_model(self.model, loader, per_image)

    def score_model(self, model: Any, loader: DataLoader, per_image: bool = False) -> dict:
        return evaluate(
            model,
            loader,
            self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            distributed=self.info.enabled,
            per_image=per_image,
        )
