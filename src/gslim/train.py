"""The training engine: supervised training and knowledge distillation, single process or DDP.

:func:`fit` trains a model described by a :class:`~gslim.models.ModelSpec` with a
:class:`~gslim.recipe.TrainConfig` and writes, in ``run_dir``:

* ``train_log.jsonl`` - one line per epoch (epoch, train_loss, train_top1, val_top1,
  val_top5, val_loss, lr, images_per_s, seconds);
* ``last.pt`` - a resumable state written atomically after every epoch (model, optimizer,
  AMP scaler, step counter, epoch, RNG states, the ModelSpec fields); loads with
  ``weights_only=True``;
* ``model.pt`` (``output_name``) - the final model as a gslim checkpoint.

Reproducibility: the order of the training data and the random state used by augmentation
and dropout are functions of ``(seed, epoch, rank)`` only (a DistributedSampler with
``set_epoch`` and a global RNG re-seeded at the start of every epoch), so a run that is
interrupted and resumed from ``last.pt`` ends with the same weights as an uninterrupted one.

Distributed training: launched by ``torchrun``, the WORLD_SIZE/RANK/LOCAL_RANK variables are
read, a process group is initialised (NCCL on CUDA, Gloo on CPU), the model is wrapped in
DistributedDataParallel and every rank sees its own shard of each epoch. Rank 0 alone logs and
writes files. The learning rate in the recipe is for a global batch of 256 and is scaled
linearly with ``batch_size * world_size``. For multi-node resume, ``run_dir`` must be on a
filesystem that every node sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from gslim.artifacts import (
    append_jsonl,
    atomic_write,
    check_output_dir,
    load_torch,
    refuse_overwrite,
    save_torch,
)
from gslim.errors import GslimError
from gslim.holdout import BestKeeper, HoldoutSplit, eval_steps, holdout_split
from gslim.models import ModelSpec, save_checkpoint
from gslim.recipe import DataConfig, DistillConfig, Recipe, TrainConfig

TRAIN_STATE_FORMAT = "gslim-train-state"
TRAIN_STATE_VERSION = 1
REFERENCE_BATCH = 256  # the recipe's lr is for this global batch size

__all__ = [
    "DistInfo",
    "TrainResult",
    "build_optimizer",
    "check_outputs",
    "cleanup_distributed",
    "distill_loss",
    "evaluate",
    "evaluate_on_recipe",
    "fit",
    "init_distributed",
    "lr_at_step",
    "param_groups",
    "scaled_lr",
    "seed_everything",
]


# ----------------------------------------------------------------------------------------------
# results, seeding, distributed set-up


@dataclass
class TrainResult:
    final_path: Path
    epochs: int
    metrics: dict = field(default_factory=dict)  # last epoch's log line (val_top1, val_top5, ...)


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False  # this module initialised the process group (and so destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global RNGs (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency, but optional here
        pass


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # A fixed mixing of (seed, epoch, rank): distinct streams per rank and per epoch.
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 12345) % (2**63 - 1)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise GslimError(f"environment variable {name}={raw!r} is not an integer") from exc


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes, if any (idempotent).

    Returns world size 1 when not launched by torchrun. Uses NCCL for CUDA devices and Gloo
    for the CPU. A group initialised by a caller is reused and left to that caller.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0), owned=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise GslimError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, world_size=world, rank=rank)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GslimError(f"cannot join the {backend} process group (rank {rank} of {world}): {first}") from exc
    return DistInfo(world, rank, local_rank, owned=True)


def cleanup_distributed(info: Optional[DistInfo] = None) -> None:
    """Destroy the process group (only the one this module created, when ``info`` is given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if info is not None and not info.owned:
        return
    dist.destroy_process_group()


def _barrier(info: DistInfo, device: torch.device) -> None:
    if info.enabled:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def _all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _device_for(cfg_device: str) -> torch.device:
    """The recipe's device; a bare 'cuda' becomes this process's GPU (LOCAL_RANK under torchrun)."""
    from gslim.commands.common import resolve_device

    device = resolve_device(cfg_device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


# ----------------------------------------------------------------------------------------------
# optimisation pieces


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


def _amp_dtype(device: torch.device, cfg: TrainConfig) -> Optional[torch.dtype]:
    """bf16 where the GPU supports it, else fp16; None (full precision) on the CPU or with amp off."""
    if device.type != "cuda" or not cfg.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# evaluation


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
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
) -> dict:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and the number of images scored.

    The model is put in eval mode and restored to its previous mode afterwards. With
    ``distributed=True`` and an initialised process group, the per-rank sums are added up
    across ranks (each rank must then score a disjoint shard).
    """
    device = torch.device(device)
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    try:
        with _progress_bar(progress, "eval", _len_or_none(loader, max_batches)) as bar:
            for i, (x, y) in enumerate(_batches(loader) if isinstance(loader, DataLoader) else loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp_dtype):
                    out = module(x)
                out = out.float()
                c1, c5 = _topk_correct(out, y, (1, 5))
                loss = F.cross_entropy(out, y, reduction="sum")
                sums += torch.stack([c1.double(), c5.double(), loss.double(), torch.tensor(
                    float(y.shape[0]), dtype=torch.float64, device=device)])
                bar.advance()
    finally:
        module.train(was_training)
    if distributed:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    top1, top5, loss, n = sums.tolist()
    n_int = round(n)
    if n_int == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "images": 0}
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": n_int}


def _eval_batch_size(data: DataConfig) -> int:
    return data.eval_batch_size or data.batch_size * 2


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
    from gslim.commands.common import resolve_device
    from gslim.data import make_dataset, make_loader

    if device is None:
        device = resolve_device(recipe.train.device if recipe.train is not None else "auto")
    device = torch.device(device)
    ds = make_dataset(recipe.data, "val", recipe.model.input_size, recipe.model.num_classes, recipe.seed)
    if limit is not None:
        if limit < 1:
            raise GslimError(f"--limit must be at least 1, got {limit}")
        ds = Subset(ds, list(range(min(limit, len(ds)))))
    loader = make_loader(ds, _eval_batch_size(recipe.data), shuffle=False, workers=recipe.data.workers)
    module = _unwrap(model)
    module.to(device)
    return evaluate(module, loader, device, progress=progress)


# ----------------------------------------------------------------------------------------------
# progress display


def _len_or_none(loader: Any, cap: Optional[int]) -> Optional[int]:
    try:
        n = len(loader)
    except TypeError:
        return cap
    return min(n, cap) if cap is not None else n


class _NullBar:
    active = False

    def advance(self) -> None:
        pass

    def show(self, completed: int, stats: str) -> None:
        pass


class _RichBar:
    active = True

    def __init__(self, progress: Any, task: Any):
        self._progress, self._task = progress, task

    def advance(self) -> None:
        self._progress.update(self._task, advance=1)

    def show(self, completed: int, stats: str) -> None:
        self._progress.update(self._task, completed=completed, stats=stats)


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: Optional[int]) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op when disabled or stderr is not a terminal."""
    if not enabled or not _stderr_is_tty():
        yield _NullBar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    ]
    # stderr was found to be a terminal above: rich need not decide again.
    with Progress(*columns, console=Console(stderr=True, force_terminal=True), transient=True) as prog:
        task = prog.add_task(description, total=total, stats="")
        yield _RichBar(prog, task)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# checkpoints of the training state


def _rng_state() -> dict[str, Any]:
    """The global RNG states, as tensors (so ``torch.load(weights_only=True)`` accepts them)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(internal), dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"] = int(pos), int(has_gauss), float(cached)
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()),
                     state["python_gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        try:
            import numpy as np

            np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"],
                                 state["numpy_has_gauss"], state["numpy_gauss"]))
        except ImportError:  # pragma: no cover
            pass


def _schedule_signature(cfg: TrainConfig, data: DataConfig, world: int, steps_per_epoch: int) -> dict:
    """Settings that a resumed run must share with the interrupted one to continue its schedule."""
    return {
        "epochs": cfg.epochs,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "warmup_epochs": cfg.warmup_epochs,
        "batch_size": data.batch_size,
        "world_size": world,
        "steps_per_epoch": steps_per_epoch,
    }


def _load_train_state(path: Path, spec: ModelSpec, signature: dict) -> dict:
    state = load_torch(path)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise GslimError(f"{path} is not a gslim training state (written by fit); remove it or drop --resume")
    for key in ("model", "optimizer", "epoch", "step", "arch", "num_classes"):
        if key not in state:
            raise GslimError(f"{path} is missing its {key!r} entry (an old or damaged training state)")
    if state["arch"] != spec.arch or int(state["num_classes"]) != int(spec.num_classes):
        raise GslimError(
            f"{path} trains a {state['arch']} with {state['num_classes']} classes but this run is a "
            f"{spec.arch} with {spec.num_classes}; use another run directory or drop --resume"
        )
    if (state.get("widths") or None) != (dict(spec.widths) if spec.widths else None):
        raise GslimError(f"{path} holds a model of other channel widths than this run's; drop --resume")
    saved = state.get("signature") or {}
    changed = [f"{k} {saved[k]}->{v}" for k, v in signature.items() if k in saved and saved[k] != v]
    if changed:
        raise GslimError(
            f"cannot resume from {path}: the schedule changed ({', '.join(changed)}); "
            "rerun with the original settings, or without --resume to start over"
        )
    return state


def _truncate_log(path: Path, last_epoch: int) -> None:
    """Keep only the log lines of epochs that the resumed state has completed."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if int(json.loads(line).get("epoch", 0)) <= last_epoch:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept)))


# ----------------------------------------------------------------------------------------------
# data


def _train_loader(ds: Dataset, batch_size: int, sampler: DistributedSampler, workers: int,
                  device: torch.device) -> DataLoader:
    from gslim.data import TensorImageDataset

    in_memory = isinstance(ds, TensorImageDataset) or (
        isinstance(ds, Subset) and isinstance(ds.dataset, TensorImageDataset)
    )
    nw = 0 if in_memory else workers
    # drop_last keeps every step at full batch (and BN away from batches of one) when possible.
    drop_last = len(sampler) >= batch_size
    # Workers are not persistent: each epoch's workers get seeds from the re-seeded generator below.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=nw, drop_last=drop_last,
                      generator=torch.Generator(), pin_memory=device.type == "cuda",
                      persistent_workers=False)


def _batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; batches assembled in this process are built with one intra-op thread.

    Per-image augmentation is a stream of tiny tensor ops: with several OpenMP threads, and
    worse on a busy machine, thread wake-ups cost 100x the work (measured: 4 ms vs 0.4-1 s per
    batch of 128 on 2 loaded cores). The model's own ops keep all threads.
    """
    it = iter(loader)
    in_process = loader.num_workers == 0
    while True:
        threads = torch.get_num_threads() if in_process else 1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        yield batch


def _val_loader(ds: Dataset, data: DataConfig, info: DistInfo) -> DataLoader:
    from gslim.data import make_loader

    if info.enabled:  # disjoint shards, no padding: sums add up to the exact full-set numbers
        ds = Subset(ds, list(range(info.rank, len(ds), info.world_size)))
    return make_loader(ds, _eval_batch_size(data), shuffle=False, workers=data.workers)


# ----------------------------------------------------------------------------------------------
# training


def check_outputs(run_dir: Path, *, force: bool = False, resume: bool = False, output_name: str = "model.pt",
                  last_name: str = "last.pt") -> None:
    """Refuse to replace a finished result, or an unfinished run's state with a fresh start."""
    run_dir = Path(run_dir)
    check_output_dir(run_dir, "run directory")  # before minutes of training, not after
    refuse_overwrite(run_dir / output_name, force, what="trained model")
    last_path = run_dir / last_name
    if last_path.is_file() and not resume and not force:
        raise GslimError(
            f"{last_path} holds an unfinished run; pass --resume to continue it or --force to start over"
        )


def fit(
    model: nn.Module,
    spec: ModelSpec,
    cfg: TrainConfig,
    data: DataConfig,
    run_dir: Path,
    *,
    seed: int = 0,
    teacher: Optional[nn.Module] = None,
    resume: bool = False,
    force: bool = False,
    output_name: str = "model.pt",
    log_name: str = "train_log.jsonl",
    last_name: str = "last.pt",
    progress: bool = True,
    quiet: bool = False,
    description: str = "train",
    on_start: Optional[Callable[[int], None]] = None,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
) -> TrainResult:
    """Train ``model`` (in place) for ``cfg.epochs`` epochs and save it to ``run_dir/output_name``.

    ``teacher`` turns on knowledge distillation with ``cfg.distill`` (alpha, temperature; the
    defaults of :class:`~gslim.recipe.DistillConfig` when the recipe has none). ``resume``
    continues from ``run_dir/last_name`` when it exists (and starts afresh, saying so, when it
    does not). An existing ``output_name`` is a finished result and an existing ``last_name``
    an unfinished one: neither is replaced by a fresh start without ``force``. ``on_start(start_epoch)`` is called on rank 0 once the data is loaded and a
    resume has been validated, before the first step (a place to record run metadata);
    ``on_epoch_end(epoch, log_line)`` is called on every rank after each epoch's checkpoint. Returns the final path, the number of epochs and the last epoch's log line.
    With ``cfg.epochs == 0`` the model is evaluated and saved unchanged.
    """
    run_dir = Path(run_dir)
    final_path = run_dir / output_name
    last_path = run_dir / last_name
    log_path = run_dir / log_name
    check_outputs(run_dir, force=force, resume=resume, output_name=output_name, last_name=last_name)

    device = _device_for(cfg.device)
    info = init_distributed(device)
    try:
        return _fit(model, spec, cfg, data, run_dir, final_path, last_path, log_path, device, info,
                    seed=seed, teacher=teacher, resume=resume, progress=progress, quiet=quiet,
                    description=description, on_start=on_start, on_epoch_end=on_epoch_end)
    finally:
        cleanup_distributed(info)


def _fit(model, spec, cfg, data, run_dir, final_path, last_path, log_path, device, info, *,
         seed, teacher, resume, progress, quiet, description, on_start, on_epoch_end) -> TrainResult:
    from gslim.data import make_dataset

    main = info.is_main
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (main and not quiet) else (lambda msg: None)

    # --- data
    split = _holdout(cfg, data, spec, seed, say)
    train_ds = split.train if split else make_dataset(data, "train", spec.input_size, spec.num_classes, seed)
    val_ds = make_dataset(data, "val", spec.input_size, spec.num_classes, seed)
    holdout_loader = _val_loader(split.holdout, data, info) if split else None
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    train_loader = _train_loader(train_ds, data.batch_size, sampler, data.workers, device)
    val_loader = _val_loader(val_ds, data, info)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise GslimError(f"the training set ({len(train_ds)} images) gives no batch of {data.batch_size}")
    global_batch = data.batch_size * info.world_size
    peak_lr = scaled_lr(cfg.lr, global_batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    # --- model, teacher, optimizer
    amp_dtype = _amp_dtype(device, cfg)
    channels_last = bool(cfg.channels_last and device.type == "cuda")
    model = _unwrap(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    distill: DistillConfig = cfg.distill or DistillConfig()
    if teacher is not None:
        teacher = _unwrap(teacher).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, peak_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    signature = _schedule_signature(cfg, data, info.world_size, steps_per_epoch)

    # --- resume or start afresh
    start_epoch, step = 0, 0
    metrics: dict = {}
    holdout_state = None
    if resume and last_path.is_file():
        state = _load_train_state(last_path, spec, signature)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        metrics = dict(state.get("metrics") or {})
        holdout_state = state.get("holdout")
        if "rng" in state:
            _set_rng_state(state["rng"])
        if main:
            _truncate_log(log_path, start_epoch)
        say(f"resuming {description} from {last_path} after epoch {start_epoch}/{cfg.epochs}")
    else:
        if resume:
            say(f"nothing to resume in {run_dir} ({last_path.name} not found): starting from epoch 0")
        if main:
            log_path.unlink(missing_ok=True)
            last_path.unlink(missing_ok=True)
    if info.enabled:  # every rank must continue from the same epoch (run_dir on a shared filesystem)
        import torch.distributed as dist

        lo_hi = torch.tensor([start_epoch, -start_epoch], dtype=torch.int64, device=device)
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MIN)
        if int(lo_hi[0]) != -int(lo_hi[1]):
            raise GslimError(
                f"ranks disagree on the epoch to resume from ({int(lo_hi[0])}..{-int(lo_hi[1])}): "
                f"{last_path} must be on a filesystem that every node sees"
            )
    if main and on_start is not None:
        on_start(start_epoch)
    _barrier(info, device)

    def score(loader) -> dict:
        _sync_buffers(model, info)  # with rank 0's BatchNorm statistics, the ones that are saved
        return evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                        distributed=info.enabled)

    holdout = None
    if holdout_loader is not None:
        holdout = _HoldoutRun(holdout_loader, holdout_state, score, steps_per_epoch,
                              getattr(cfg, "holdout_evals_per_epoch", 1))
        if holdout_state is None:  # the starting (one-shot) model: what must not be lost
            start = holdout.offer(model, start_epoch, step)
            say(f"{description}: the starting model scores {start['holdout_top1']:.2f}% on "
                f"{len(split.holdout)} held-out training images")

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    for epoch in range(start_epoch, cfg.epochs):
        # Everything random in an epoch derives from (seed, epoch, rank): resumable bit for bit.
        epoch_seed = _epoch_seed(seed, epoch, info.rank)
        seed_everything(epoch_seed)
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(epoch_seed)  # worker seeds (file-backed datasets)
        t0 = time.perf_counter()
        train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        lr = peak_lr
        label = f"{description} {epoch + 1}/{cfg.epochs}"
        with _progress_bar(progress and main, label, steps_per_epoch) as bar:
            seen_local, t_stats = 0, 0.0
            for i, (x, y) in enumerate(_batches(train_loader)):
                if i >= steps_per_epoch:
                    break
                lr = lr_at_step(step, peak_lr, total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp_dtype):
                    out = train_model(x)
                    t_out = None
                    if teacher is not None and distill.alpha > 0:
                        with torch.no_grad():
                            t_out = teacher(x)
                loss = distill_loss(out, y, t_out, alpha=distill.alpha, temperature=distill.temperature,
                                    label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if holdout is not None and holdout.due_mid_epoch(i + 1):
                    holdout.offer(model, epoch + (i + 1) / steps_per_epoch, step)
                    train_model.train()
                n = y.shape[0]
                seen_local += n
                with torch.no_grad():
                    correct = (out.detach().argmax(dim=1) == y).sum()
                    sums += torch.stack([loss.detach().double() * n, correct.double(),
                                         torch.tensor(float(n), dtype=torch.float64, device=device)])
                if bar.active:
                    now = time.perf_counter()
                    if now - t_stats >= 0.5 or i + 1 == steps_per_epoch:  # .tolist() syncs: not every step
                        t_stats = now
                        loss_sum, corr, cnt = sums.tolist()
                        ips = seen_local * info.world_size / max(now - t0, 1e-9)
                        bar.show(i + 1, f"loss {loss_sum / cnt:.4f}  acc {100 * corr / cnt:5.2f}%  "
                                        f"{ips:,.0f} img/s  lr {lr:.4g}")
                    else:
                        bar.advance()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        sums = _all_reduce_sum(sums, info)
        loss_sum, correct, count = sums.tolist()
        if not math.isfinite(loss_sum) and holdout is not None:
            # the held-out selection still has a good checkpoint (at worst the starting model)
            say(f"warning: {description} diverged (non-finite loss) in epoch {epoch + 1}; stopping and keeping "
                "the best checkpoint scored so far (lower finetune.lr)")
            holdout.keeper.best["diverged_at_epoch"] = epoch + 1
            break
        if not math.isfinite(loss_sum):
            raise GslimError(
                f"training diverged (non-finite loss) in epoch {epoch + 1}; lower train.lr or raise "
                "train.warmup_epochs"
            )

        point = holdout.offer(model, epoch + 1, step) if holdout is not None else None
        val = score(val_loader)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100.0 * correct / max(count, 1),
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
            "lr": lr,
            "images_per_s": count / max(train_seconds, 1e-9),
            "seconds": time.perf_counter() - t0,
        }
        if point is not None:
            metrics.update(holdout.log_fields(point))
        if main:
            save_torch(_train_state(model, optimizer, scaler, spec, epoch + 1, step, seed, signature, metrics,
                                    holdout.keeper if holdout else None), last_path)
            append_jsonl(metrics, log_path)
        say(f"{description} epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f}  "
            f"train top-1 {metrics['train_top1']:.2f}%  val top-1 {metrics['val_top1']:.2f}%  "
            f"top-5 {metrics['val_top5']:.2f}%  {metrics['images_per_s']:,.0f} img/s  {metrics['seconds']:.1f} s")
        _barrier(info, device)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, dict(metrics))

    if not metrics:  # zero epochs, or resumed after the last one: report the model as it is
        if info.enabled:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, src=0)
        val = evaluate(model, val_loader, device, amp_dtype=amp_dtype, distributed=info.enabled)
        metrics = {"epoch": cfg.epochs, "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}

    selection = None
    if holdout is not None:
        selection = holdout.keeper.summary()
        if holdout.restore_best(model, step):  # an earlier checkpoint was better: report that one
            val = score(val_loader)
            metrics = {**metrics, "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
        metrics = {**metrics, "selection": selection}
        say(f"{description}: {holdout.describe_kept(selection)}")
    model.to(memory_format=torch.contiguous_format)
    if main:
        out_spec = ModelSpec(
            arch=spec.arch, num_classes=spec.num_classes, input_size=spec.input_size, widths=spec.widths,
            meta={**(spec.meta or {}), "train": {
                "epochs": cfg.epochs, "seed": seed, "world_size": info.world_size,
                "val_top1": metrics.get("val_top1"), "val_top5": metrics.get("val_top5"),
                "distilled": teacher is not None, "selection": selection,
            }},
        )
        save_checkpoint(model, out_spec, final_path)
    _barrier(info, device)
    model.eval()
    return TrainResult(final_path=final_path, epochs=cfg.epochs, metrics=metrics)


class _HoldoutRun:
    """A fine-tune's held-out selection (:mod:`gslim.holdout`): when to score, scoring a checkpoint,
    and putting the best one back at the end. ``score(loader)`` evaluates the model being trained."""

    def __init__(self, loader, state: Optional[dict], score: Callable, steps_per_epoch: int, evals: int):
        self.loader, self.score = loader, score
        self.keeper = BestKeeper.from_state(state) if state else BestKeeper()
        self.steps_per_epoch = steps_per_epoch
        self.checkpoints = eval_steps(steps_per_epoch, evals)

    def due_mid_epoch(self, step_in_epoch: int) -> bool:
        return step_in_epoch in self.checkpoints and step_in_epoch < self.steps_per_epoch  # the end: see _fit

    def offer(self, model: nn.Module, epoch_done: float, step: int) -> dict:
        res = self.score(self.loader)
        point = {"epoch": round(epoch_done, 4), "step": step, "holdout_top1": res["top1"], "holdout_loss": res["loss"]}
        point["kept"] = self.keeper.offer(model, point)
        return point

    def log_fields(self, point: dict) -> dict:
        best = self.keeper.best
        return {"holdout_top1": point["holdout_top1"], "holdout_best_top1": best["holdout_top1"],
                "holdout_best_step": best["step"]}

    def restore_best(self, model: nn.Module, step: int) -> bool:
        """Load the best checkpoint into ``model`` unless it is the current one; True if it loaded."""
        if self.keeper.best is None or self.keeper.best["step"] == step:
            return False
        self.keeper.restore(model)
        return True

    @staticmethod
    def describe_kept(selection: dict) -> str:
        kept = selection["kept"]
        where = "the starting model" if selection["kept_start"] else f"epoch {kept['epoch']}"
        return f"kept the checkpoint of step {kept['step']} ({where}), {kept['holdout_top1']:.2f}% on the held-out images"


def _holdout(cfg, data: DataConfig, spec: ModelSpec, seed: int, say) -> Optional["HoldoutSplit"]:
    """The fine-tune's held-out slice of the training set (None: no selection)."""
    count = int(getattr(cfg, "holdout_images", 0) or 0)
    if count <= 0 or cfg.epochs <= 0:
        return None
    split = holdout_split(data, spec.input_size, spec.num_classes, seed, count)
    if split is None:
        say("the training set is too small to hold images out: the last checkpoint is kept")
    return split


def _sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Score with rank 0's BatchNorm statistics, the ones that are saved."""
    if info.enabled:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)


def _train_state(model, optimizer, scaler, spec: ModelSpec, epoch: int, step: int, seed: int,
                 signature: dict, metrics: dict, keeper: Optional[BestKeeper] = None) -> dict:
    return {
        "holdout": keeper.to_state() if keeper is not None else None,
        "format": TRAIN_STATE_FORMAT,
        "version": TRAIN_STATE_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch,
        "step": step,
        "seed": seed,
        "signature": signature,
        "metrics": dict(metrics),
        "rng": _rng_state(),
        "arch": spec.arch,
        "num_classes": int(spec.num_classes),
        "input_size": int(spec.input_size),
        "widths": {k: int(v) for k, v in spec.widths.items()} if spec.widths else None,
        "meta": spec.meta or {},
    }

