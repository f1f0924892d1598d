"""Scoring a model: top-1/top-5 accuracy and mean loss on a loader or on a recipe's
validation data (summed across ranks under torchrun)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from gslim.environment import resolve_device
from gslim.errors import GslimError
from gslim.progress import bar
from gslim.recipe import Recipe
from gslim.train.distributed import unwrap
from gslim.train.loaders import eval_batch_size, iterate_batches
from gslim.train.optim import autocast


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = pred.eq(targets.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: Any,
    max_batches: Optional[int] = None,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    distributed: bool = False,
    progress: bool = False,
    per_image: bool = False,
) -> dict:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and the number of images scored.

    The model is put in eval mode and restored to its previous mode afterwards. With
    ``distributed=True`` and an initialised process group, the per-rank sums are added up
    across ranks (each rank must then score a disjoint shard). ``per_image`` adds ``correct``:
    each image's top-1 hit (a bool tensor on the CPU) in the order of the dataset, which under
    torchrun is rebuilt from the ranks' strided shards (:func:`gslim.train.loaders.val_loader`).
    """
    device = torch.device(device)
    module = unwrap(model)
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    hits: list[torch.Tensor] = []
    try:
        with bar(progress, "eval", _len_or_none(loader, max_batches)) as task:
            for i, (x, y) in enumerate(iterate_batches(loader) if isinstance(loader, DataLoader) else loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp_dtype):
                    out = module(x)
                out = out.float()
                c1, c5 = topk_correct(out, y, (1, 5))
                if per_image:
                    hits.append(out.argmax(dim=1).eq(y).cpu())
                loss = F.cross_entropy(out, y, reduction="sum")
                sums += torch.stack(
                    [
                        c1.double(),
                        c5.double(),
                        loss.double(),
                        torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device),
                    ]
                )
                task.advance()
    finally:
        module.train(was_training)
    if distributed:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    top1, top5, loss, n = sums.tolist()
    n_int = round(n)
    if n_int == 0:
        out = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "images": 0}
    else:
        out = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": n_int}
    if per_image:
        mine = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
        out["correct"] = _gather_strided(mine, device) if distributed else mine
    return out


def _gather_strided(mine: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ranks' per-image hits back in dataset order: rank r scored images r, r+W, r+2W, ..."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return mine
    world = dist.get_world_size()
    count = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: mine.numel()] = mine.to(device=device, dtype=torch.uint8)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    total = sum(int(c) for c in counts)
    full = torch.zeros(total, dtype=torch.bool)
    for r, (part, c) in enumerate(zip(parts, counts)):
        full[r::world] = part[: int(c)].cpu().bool()
    return full


def evaluate_on_recipe(
    model: nn.Module,
    recipe: Recipe,
    device: Any = None,
    limit: Optional[int] = None,
    *,
    progress: bool = False,
) -> dict:
    """Score ``model`` on the recipe's validation data (the first ``limit`` images when given).

    The model is moved to ``device`` (default: the recipe's train.device, else auto).
    """
    from gslim.data import make_dataset, make_loader

    if device is None:
        device = resolve_device(recipe.train.device if recipe.train is not None else "auto")
    device = torch.device(device)
    ds = make_dataset(recipe.data, "val", recipe.model.input_size, recipe.model.num_classes, recipe.seed)
    if limit is not None:
        if limit < 1:
            raise GslimError(f"--limit must be at least 1, got {limit}")
        ds = Subset(ds, list(range(min(limit, len(ds)))))
    loader = make_loader(ds, eval_batch_size(recipe.data), shuffle=False, workers=recipe.data.workers)
    module = unwrap(model)
    module.to(device)
    return evaluate(module, loader, device, progress=progress)


def _len_or_none(loader: Any, cap: Optional[int]) -> Optional[int]:
    try:
        n = len(loader)
    except TypeError:
        return cap
    return min(n, cap) if cap is not None else n
