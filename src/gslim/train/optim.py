"""Optimisation pieces: the learning-rate rule and schedule, weight-decay groups, the
optimizer, the distillation loss and mixed precision."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gslim.errors import GslimError
from gslim.recipe import TrainConfig

REFERENCE_BATCH = 256  # the recipe's lr is for this global batch size


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is the peak learning rate for a global batch of 256."""
    return base_lr * global_batch / REFERENCE_BATCH


def lr_at_step(step: int, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ``peak/warmup`` to ``peak`` over ``warmup_steps``, then cosine to 0.

    ``step`` counts optimizer steps from 0; the value is the lr used *for* that step.
    """
    if total_steps <= 0:
        return peak_lr
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights of convolutions/linears with decay; BN/norm parameters and biases without.

    A parameter is exempt when it is a bias or belongs to a normalisation layer (any
    parameter with at most one dimension: BN/GN/LN scales and shifts, biases).
    """
    decay, no_decay = [], []
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, norm_types) or name.endswith("bias") or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise GslimError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        nesterov = bool(cfg.nesterov and cfg.momentum > 0)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=lr)


def distill_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    *,
    alpha: float = 0.5,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1-alpha)*CE(student, y) + alpha*T^2*KL(softmax(t/T) || softmax(s/T))`` (batch mean).

    Without a teacher (or with ``alpha == 0``) this is the label-smoothed cross-entropy.
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, targets, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(s / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * (t * t) * kl


def amp_dtype_for(device: torch.device, cfg: TrainConfig) -> Optional[torch.dtype]:
    """bf16 where the GPU supports it, else fp16; None (full precision) on the CPU or with amp off."""
    if device.type != "cuda" or not cfg.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# evaluation
