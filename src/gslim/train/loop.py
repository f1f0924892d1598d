"""The training loop: :func:`fit` trains a model, single process or under torchrun, with
optional distillation and (for fine-tunes) held-out checkpoint selection.

:func:`fit` writes, in ``run_dir``:

* ``train_log.jsonl`` - one line per epoch (epoch, train_loss, train_top1, val_top1,
  val_top5, val_loss, lr, images_per_s, seconds);
* ``last.pt`` - a resumable state written atomically after every epoch (:mod:`.state`);
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

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from gslim.artifacts import append_jsonl, save_torch
from gslim.errors import GslimError
from gslim.models import ModelSpec, save_checkpoint
from gslim.progress import bar
from gslim.recipe import DataConfig, DistillConfig, TrainConfig
from gslim.train.context import TrainResult, TrainRun
from gslim.train.distributed import (
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    device_for,
    epoch_seed,
    init_distributed,
    seed_everything,
    unwrap,
)
from gslim.train.evaluate import evaluate
from gslim.train.finetune_lr import apply_lr_rule, is_auto, resolve_auto_lr
from gslim.train.loaders import iterate_batches, train_loader, val_loader
from gslim.train.optim import amp_dtype_for, autocast, build_optimizer, distill_loss, lr_at_step, scaled_lr
from gslim.train.selection import HoldoutRun, training_split
from gslim.train.state import (
    check_outputs,
    load_train_state,
    schedule_signature,
    set_rng_state,
    train_state,
    truncate_log,
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
    lr_reference: Optional[dict] = None,
    reserve_holdout: int = 0,
) -> TrainResult:
    """Train ``model`` (in place) for ``cfg.epochs`` epochs and save it to ``run_dir/output_name``.

    ``teacher`` turns on knowledge distillation with ``cfg.distill`` (alpha, temperature; the
    defaults of :class:`~gslim.recipe.DistillConfig` when the recipe has none). ``resume``
    continues from ``run_dir/last_name`` when it exists (and starts afresh, saying so, when it
    does not). An existing ``output_name`` is a finished result and an existing ``last_name``
    an unfinished one: neither is replaced by a fresh start without ``force``.
    ``on_start(start_epoch)`` is called on rank 0 once the data is loaded and a resume has been
    validated, before the first step (a place to record run metadata); ``on_epoch_end(epoch,
    log_line)`` is called on every rank after each epoch's checkpoint. ``lr_reference`` (``{"lr",
    "optimizer", "source"}``: how the base model was trained) is what a fine-tune's ``lr: auto`` is
    derived from (:mod:`gslim.train.finetune_lr`). ``reserve_holdout`` keeps the fine-tune's
    held-out slice of that many images out of a base's training. Returns the final path,
    the number of epochs and the last epoch's log line. With ``cfg.epochs == 0`` the model is
    evaluated and saved unchanged.
    """
    run_dir = Path(run_dir)
    check_outputs(run_dir, force=force, resume=resume, output_name=output_name, last_name=last_name)
    device = device_for(cfg.device)
    info = init_distributed(device)
    try:
        run = TrainRun(
            cfg=cfg,
            data=data,
            spec=spec,
            seed=seed,
            device=device,
            info=info,
            run_dir=run_dir,
            final_path=run_dir / output_name,
            last_path=run_dir / last_name,
            log_path=run_dir / log_name,
            description=description,
            progress=progress,
            quiet=quiet,
            lr_reference=lr_reference,
            reserve_holdout=reserve_holdout,
        )
        return _fit(run, model, teacher, resume=resume, on_start=on_start, on_epoch_end=on_epoch_end)
    finally:
        cleanup_distributed(info)


def _fit(
    run: TrainRun,
    model: nn.Module,
    teacher: Optional[nn.Module],
    *,
    resume: bool,
    on_start: Optional[Callable[[int], None]],
    on_epoch_end: Optional[Callable[[int, dict], None]],
) -> TrainResult:
    _prepare_data(run)
    _prepare_model(run, model, teacher)
    _resume_or_start(run, resume)
    _agree_on_start_epoch(run)
    if run.info.is_main and on_start is not None:
        on_start(run.start_epoch)
    barrier(run.info, run.device)
    _start_selection(run)
    run.train_model = run.model
    if run.info.enabled:
        run.train_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    _resolve_auto_lr(run)
    for epoch in range(run.start_epoch, run.cfg.epochs):
        t0 = time.perf_counter()
        sums, lr, train_seconds = _train_epoch(run, epoch)
        sums = all_reduce_sum(sums, run.info)
        if _diverged(run, sums, epoch):
            break
        run.metrics = _end_epoch(run, epoch, sums.tolist(), lr, train_seconds, t0)
        barrier(run.info, run.device)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, dict(run.metrics))
    if not run.metrics:  # zero epochs, or resumed after the last one: report the model as it is
        run.metrics = _score_unchanged(run)
    return _finish(run)


def _prepare_data(run: TrainRun) -> None:
    from gslim.data import make_dataset

    cfg, data, spec, info = run.cfg, run.data, run.spec, run.info
    run.split, train_ds = training_split(cfg, data, spec, run.seed, run.say, run.reserve_holdout)
    val_ds = make_dataset(data, "val", spec.input_size, spec.num_classes, run.seed)
    run.sampler = DistributedSampler(
        train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=run.seed, drop_last=False
    )
    run.train_loader = train_loader(train_ds, data.batch_size, run.sampler, data.workers, run.device)
    run.val_loader = val_loader(val_ds, data, info)
    steps = len(run.train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise GslimError(f"the training set ({len(train_ds)} images) gives no batch of {data.batch_size}")
    run.steps_per_epoch = steps
    # an 'auto' fine-tuning lr is known once the starting model is scored (_resolve_auto_lr)
    run.peak_lr = 0.0 if is_auto(cfg.lr) else scaled_lr(cfg.lr, data.batch_size * info.world_size)
    run.total_steps = cfg.epochs * steps
    run.warmup_steps = round(cfg.warmup_epochs * steps)
    run.signature = schedule_signature(cfg, data, info.world_size, steps)


def _prepare_model(run: TrainRun, model: nn.Module, teacher: Optional[nn.Module]) -> None:
    run.amp_dtype = amp_dtype_for(run.device, run.cfg)
    run.channels_last = bool(run.cfg.channels_last and run.device.type == "cuda")
    run.model = unwrap(model)
    run.model.to(run.device)
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
    run.distill = run.cfg.distill or DistillConfig()
    if teacher is not None:
        teacher = unwrap(teacher).to(run.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if run.channels_last:
            teacher.to(memory_format=torch.channels_last)
    run.teacher = teacher
    run.optimizer = build_optimizer(run.model, run.cfg, run.peak_lr)
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)


def _resume_or_start(run: TrainRun, resume: bool) -> None:
    main = run.info.is_main
    if resume and run.last_path.is_file():
        state = load_train_state(run.last_path, run.spec, run.signature)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.start_epoch, run.step = int(state["epoch"]), int(state["step"])
        run.metrics = dict(state.get("metrics") or {})
        run.holdout_state = state.get("holdout")
        run.lr_rule = state.get("lr_rule")
        if "rng" in state:
            set_rng_state(state["rng"])
        if main:
            truncate_log(run.log_path, run.start_epoch, run.metrics)
        run.say(
            f"resuming {run.description} from {run.last_path} after epoch {run.start_epoch}/{run.cfg.epochs}"
        )
        return
    if resume:
        run.say(f"nothing to resume in {run.run_dir} ({run.last_path.name} not found): starting from epoch 0")
    if main:
        run.log_path.unlink(missing_ok=True)
        run.last_path.unlink(missing_ok=True)


def _agree_on_start_epoch(run: TrainRun) -> None:
    """Every rank must continue from the same epoch (run_dir on a shared filesystem)."""
    if not run.info.enabled:
        return
    import torch.distributed as dist

    lo_hi = torch.tensor([run.start_epoch, -run.start_epoch], dtype=torch.int64, device=run.device)
    dist.all_reduce(lo_hi, op=dist.ReduceOp.MIN)
    if int(lo_hi[0]) != -int(lo_hi[1]):
        raise GslimError(
            f"ranks disagree on the epoch to resume from ({int(lo_hi[0])}..{-int(lo_hi[1])}): "
            f"{run.last_path} must be on a filesystem that every node sees"
        )


def _start_selection(run: TrainRun) -> None:
    """A fine-tune's held-out selection; a fresh one first scores the starting (one-shot) model."""
    if run.split is None:
        return
    loader = val_loader(run.split.holdout, run.data, run.info)
    run.holdout = HoldoutRun(
        loader,
        run.holdout_state,
        run.score,
        run.steps_per_epoch,
        getattr(run.cfg, "holdout_evals_per_epoch", 1),
        getattr(run.cfg, "holdout_confidence", 0.0),
    )
    if run.holdout_state is None:  # the starting model: what must not be lost
        start = run.holdout.offer(run.model, run.start_epoch, run.step)
        text = f"{start['holdout_top1']:.2f}%"
        if run.teacher is not None:
            teacher = run.holdout.score_teacher(run.teacher, run.score_model)
            text += f" (the teacher: {teacher['holdout_top1']:.2f}%)"
        run.say(
            f"{run.description}: the starting model scores {text} on {len(run.split.holdout)} held-out training images"
        )


def _resolve_auto_lr(run: TrainRun) -> None:
    """An 'auto' fine-tuning lr: probed on the held-out images (:mod:`.finetune_lr`); a resumed run
    keeps the lr it started with."""
    if not is_auto(run.cfg.lr):
        return
    if run.lr_rule is None:
        resolve_auto_lr(run, _optimizer_step)
        run.say(f"{run.description}: lr auto = {run.lr_rule['lr']:.4g} at batch 256 ({run.lr_rule['why']})")
    apply_lr_rule(run)  # the peak lr, and the distillation the probe chose (also on a resume)


def _train_epoch(run: TrainRun, epoch: int) -> tuple[torch.Tensor, float, float]:
    """One epoch of optimizer steps. Returns this rank's (loss*n, correct, n), the last lr and
    the seconds it took."""
    # Everything random in an epoch derives from (seed, epoch, rank): resumable bit for bit.
    seed = epoch_seed(run.seed, epoch, run.info.rank)
    seed_everything(seed)
    run.sampler.set_epoch(epoch)
    run.train_loader.generator.manual_seed(seed)  # worker seeds (file-backed datasets)
    t0 = time.perf_counter()
    run.train_model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss*n, correct, n
    lr = run.peak_lr
    label = f"{run.description} {epoch + 1}/{run.cfg.epochs}"
    with bar(run.progress and run.info.is_main, label, run.steps_per_epoch, stats="") as task:
        seen_local, t_stats = 0, 0.0
        for i, (x, y) in enumerate(iterate_batches(run.train_loader)):
            if i >= run.steps_per_epoch:
                break
            lr = lr_at_step(run.step, run.peak_lr, run.total_steps, run.warmup_steps)
            loss, out = _optimizer_step(run, x, y, lr)
            y = y.to(run.device, non_blocking=True)
            run.step += 1
            if run.holdout is not None and run.holdout.due_mid_epoch(i + 1):
                run.holdout.offer(run.model, epoch + (i + 1) / run.steps_per_epoch, run.step)
                run.train_model.train()
            n = y.shape[0]
            seen_local += n
            with torch.no_grad():
                correct = (out.detach().argmax(dim=1) == y).sum()
                sums += torch.stack(
                    [
                        loss.detach().double() * n,
                        correct.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=run.device),
                    ]
                )
            if task.active:
                now = time.perf_counter()
                if now - t_stats >= 0.5 or i + 1 == run.steps_per_epoch:  # .tolist() syncs: not every step
                    t_stats = now
                    loss_sum, corr, cnt = sums.tolist()
                    ips = seen_local * run.info.world_size / max(now - t0, 1e-9)
                    task.update(
                        i + 1,
                        stats=f"loss {loss_sum / cnt:.4f}  acc {100 * corr / cnt:5.2f}%  "
                        f"{ips:,.0f} img/s  lr {lr:.4g}",
                    )
                else:
                    task.advance()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return sums, lr, time.perf_counter() - t0


def _optimizer_step(
    run: TrainRun, x: torch.Tensor, y: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x = x.to(run.device, non_blocking=True)
    y = y.to(run.device, non_blocking=True)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(run.device, run.amp_dtype):
        out = run.train_model(x)
        t_out = None
        if run.teacher is not None and run.distill.alpha > 0:
            with torch.no_grad():
                t_out = run.teacher(x)
    loss = distill_loss(
        out,
        y,
        t_out,
        alpha=run.distill.alpha,
        temperature=run.distill.temperature,
        label_smoothing=run.cfg.label_smoothing,
    )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, out


def _diverged(run: TrainRun, sums: torch.Tensor, epoch: int) -> bool:
    """True when a fine-tune diverged (its selection still holds a good checkpoint); a plain
    training run that diverges is an error."""
    if math.isfinite(sums[0].item()):
        return False
    if run.holdout is not None:  # at worst the starting model
        run.say(
            f"warning: {run.description} diverged (non-finite loss) in epoch {epoch + 1}; stopping and "
            "keeping the best checkpoint scored so far (lower finetune.lr)"
        )
        run.holdout.keeper.best["diverged_at_epoch"] = epoch + 1
        return True
    raise GslimError(
        f"training diverged (non-finite loss) in epoch {epoch + 1}; lower train.lr or raise train.warmup_epochs"
    )


def _end_epoch(
    run: TrainRun, epoch: int, sums: list[float], lr: float, train_seconds: float, t0: float
) -> dict:
    """Score the epoch, write ``last.pt`` and the log line; returns the log line."""
    loss_sum, correct, count = sums
    point = run.holdout.offer(run.model, epoch + 1, run.step) if run.holdout is not None else None
    val = run.score(run.val_loader)
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
        metrics.update(run.holdout.log_fields(point))
    if run.info.is_main:
        save_torch(
            train_state(
                run.model,
                run.optimizer,
                run.scaler,
                run.spec,
                epoch + 1,
                run.step,
                run.seed,
                run.signature,
                metrics,
                run.holdout.keeper if run.holdout else None,
                run.lr_rule,
            ),
            run.last_path,
        )
        append_jsonl(metrics, run.log_path)
    run.say(
        f"{run.description} epoch {epoch + 1}/{run.cfg.epochs}: loss {metrics['train_loss']:.4f}  "
        f"train top-1 {metrics['train_top1']:.2f}%  val top-1 {metrics['val_top1']:.2f}%  "
        f"top-5 {metrics['val_top5']:.2f}%  {metrics['images_per_s']:,.0f} img/s  {metrics['seconds']:.1f} s"
    )
    return metrics


def _score_unchanged(run: TrainRun) -> dict:
    if run.info.enabled:
        import torch.distributed as dist

        for b in run.model.buffers():
            dist.broadcast(b, src=0)
    val = evaluate(
        run.model, run.val_loader, run.device, amp_dtype=run.amp_dtype, distributed=run.info.enabled
    )
    return {
        "epoch": run.cfg.epochs,
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_loss": val["loss"],
    }


def _finish(run: TrainRun) -> TrainResult:
    """Put the kept checkpoint back (fine-tunes), save the final model, return the result."""
    metrics, model = run.metrics, run.model
    selection = None
    if run.holdout is not None:
        selection = {**run.holdout.keeper.summary(), **({"lr": run.lr_rule} if run.lr_rule else {})}
        if run.holdout.restore_best(model, run.step):  # an earlier checkpoint was better: report that one
            val = run.score(run.val_loader)
            metrics = {**metrics, "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]}
        metrics = {**metrics, "selection": selection}
        run.say(f"{run.description}: {run.holdout.describe_kept(selection)}")
    model.to(memory_format=torch.contiguous_format)
    if run.info.is_main:
        spec = run.spec
        out_spec = ModelSpec(
            arch=spec.arch,
            num_classes=spec.num_classes,
            input_size=spec.input_size,
            widths=spec.widths,
            meta={
                **(spec.meta or {}),
                "train": {
                    "epochs": run.cfg.epochs,
                    "seed": run.seed,
                    "world_size": run.info.world_size,
                    "val_top1": metrics.get("val_top1"),
                    "val_top5": metrics.get("val_top5"),
                    "distilled": run.teacher is not None,
                    "selection": selection,
                    # what a later fine-tune's 'lr: auto' derives from (batch-256 peak lr)
                    "lr": run.lr_rule["lr"] if run.lr_rule else run.cfg.lr,
                    "optimizer": run.cfg.optimizer,
                    **({"lr_rule": run.lr_rule} if run.lr_rule else {}),
                },
            },
        )
        save_checkpoint(model, out_spec, run.final_path)
    barrier(run.info, run.device)
    model.eval()
    return TrainResult(final_path=run.final_path, epochs=run.cfg.epochs, metrics=metrics)
