"""The default learning rate of a fine-tune (``finetune.lr: auto``), chosen on the held-out slice.

The reference is the base's training peak lr (from its checkpoint when gslim trained it, else
the recipe's train section; both at batch 256, scaled to the global batch). No one factor of it
suits every model: on the demo's greedy MobileNetV2 0.5x gained most (+0.86 at 30% MACs, where
0.2x gained +0.36 and 0.05x +0.46), while on ``benchmarks/compare.py``'s MobileNetV3-small the
same 0.5x cost the magnitude baselines 1 to 12 points against 0.2x (BENCHMARKS.md,
"Fine-tuning"). So an 'auto' lr is *measured*: each factor in ``finetune.lr_probe_factors`` runs a
short fine-tune of its own (a quarter of the run's steps, or the whole run when it has at most
``PROBE_WHOLE_STEPS``; cosine to zero, the same batches for every factor, from the same start),
each is scored on the held-out images, and the first factor is the fine-tune's unless another
beats it on a paired test (``_followed_probe``: a short probe favours a small lr). The probe's
weights are thrown away: the fine-tune starts again from the start with the chosen lr. With no
held-out slice (or a single factor) the first factor is used unmeasured.

With distillation on, the distillation pair (alpha, temperature) is probed too: every factor runs
with the recipe's pair and with each pair of ``finetune.distill_probe``; the fine-tune takes the
best factor with the recipe's pair, unless another pair's best probe beats it on a paired test with
the fine-tune's ``holdout_confidence``. No one pair suits every start (BENCHMARKS.md, "the distillation pair chosen by
the probe"): alpha 0.5,
T 4 ended higher on the demo's greedy models (+0.18 to +0.56 on the test set) and alpha 0.7, T 2
on a magnitude-pruned MobileNetV2 that starts at 18% (+1.5 over two seeds); in those cells the
held-out probe ranked the pairs as the test set did. Both at once rather than one after the other:
on a magnitude-pruned ResNet-18 the best lr depended on the pair.

The gap between the start and the teacher on the held-out images is recorded (the report shows
it) but does not set the lr: a rule that lowered the lr for a start close to its teacher was
measured on the demo and lost to a constant factor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from gslim.holdout import paired_z, z_threshold
from gslim.progress import bar
from gslim.recipe import TrainConfig
from gslim.train.distributed import all_reduce_sum, epoch_seed, seed_everything
from gslim.train.loaders import iterate_batches
from gslim.train.optim import build_optimizer, lr_at_step, scaled_lr

PROBE_FRACTION = 0.25  # of the fine-tune's steps, per probed factor
PROBE_WHOLE_STEPS = 64  # a fine-tune this short is probed whole: a quarter of it says little


def is_auto(lr: Any) -> bool:
    return isinstance(lr, str) and lr == "auto"


def probe_steps(total_steps: int) -> int:
    if total_steps <= PROBE_WHOLE_STEPS:
        return total_steps
    return max(PROBE_WHOLE_STEPS // 4, math.ceil(total_steps * PROBE_FRACTION))


def derive_finetune_lr(
    reference: Optional[dict],
    optimizer: str,
    start_top1: Optional[float],
    teacher_top1: Optional[float],
    factor: float,
) -> dict[str, Any]:
    """The fine-tune's peak lr at batch 256 for ``factor`` of the base's lr, and where it came from
    (recorded in the run's files).

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
    gap_text = (
        "unknown gap to the teacher" if gap is None else f"the start is {gap:+.2f} points from the teacher"
    )
    return {
        "lr": float(ref["lr"]) * factor,
        "reference_lr": float(ref["lr"]),
        "reference_source": ref.get("source", "base checkpoint"),
        "gap_points": gap,
        "factor": factor,
        "why": f"{factor:.3g} x the base's {float(ref['lr']):.4g}; {gap_text}",
    }


def resolve_auto_lr(run, step_fn: Callable) -> None:
    """Set ``run.lr_rule`` for an 'auto' lr: probe the factors (and the distillation pairs) on the
    held-out images when there are some. ``step_fn(run, x, y, lr)`` is one optimizer step of the run."""
    keeper = run.holdout.keeper if run.holdout is not None else None
    start = keeper.history[0]["holdout_top1"] if keeper and keeper.history else None
    teacher = (keeper.teacher or {}).get("holdout_top1") if keeper else None
    rules = [
        derive_finetune_lr(run.lr_reference, run.cfg.optimizer, start, teacher, f)
        for f in run.cfg.lr_probe_factors
    ]
    run.lr_rule = rules[0]
    if run.holdout is None or len(rules) == 1 or run.total_steps <= 0:
        return
    current, pairs = run.distill, _distill_pairs(run)
    probes, hits = [], []
    for i, rule in enumerate(rules):
        for j, (alpha, temperature) in enumerate(pairs):
            run.distill = current.model_copy(update={"alpha": alpha, "temperature": temperature})
            what = f"lr {rule['factor']:.3g}x" + (
                f", {_pair_text(alpha, temperature)}" if len(pairs) > 1 else ""
            )
            point, correct = _probe(run, step_fn, rule, what=what)
            probes.append({**point, "rule": i, "pair": j, "alpha": alpha, "temperature": temperature})
            hits.append(correct)
    run.distill = current
    best = probes[_followed_probe(probes, hits, run.cfg.holdout_confidence)]
    scores = ", ".join(f"{p['what']} {p['holdout_top1']:.2f}%" for p in probes)
    run.lr_rule = {**rules[best["rule"]], "probe": {"steps": probes[0]["steps"], "points": probes}}
    run.lr_rule["why"] += f"; chosen on the held-out images by a {probes[0]['steps']}-step probe: {scores}"
    if len(pairs) > 1:
        run.lr_rule["distill"] = {"alpha": best["alpha"], "temperature": best["temperature"]}
        run.lr_rule["why"] += f"; distillation {_pair_text(best['alpha'], best['temperature'])}"


def _followed_probe(probes: list[dict], hits: list, confidence: float) -> int:
    """The probe whose lr and pair the fine-tune takes: the first factor of
    ``finetune.lr_probe_factors`` with the recipe's pair, unless another factor (same pair), then
    another pair, beats it on a paired test over the same held-out images with the fine-tune's
    ``holdout_confidence`` (as a checkpoint must beat the start).

    The top of six noisy scores is not followed. Pairs: the demo's greedy starts sit within 1.5
    points of the teacher, the pairs differed there by 1 to 5 of 5,000 held-out images, and
    following the top cost 0.35 and 0.55 points on the test set; a magnitude-pruned start at 18%
    differed by ~50 images. Factors: a probe is a quarter of the run, and a short run favours a
    small lr (it moves the start least), while the whole run gains more with the large one. On
    the demo's 30% MACs model the factors differed by 5 to 15 of 5,000 images; the top was 0.5x
    on one machine (+1.70 on the test set) and 0.08x on another (-0.29); 0.5x had gained most at
    30% in every measurement (BENCHMARKS.md, "Fine-tuning"), while the 1-12 point losses of 0.5x
    on magnitude-pruned MobileNetV3-small are differences a paired test sees."""
    z_min = z_threshold(confidence)

    def key(i: int) -> tuple[float, float]:
        return (probes[i]["holdout_top1"], -probes[i]["holdout_loss"])

    def beats(i: int, ref: int, label: str) -> bool:
        if key(i) <= key(ref):
            return False
        if z_min is None or hits[i] is None or hits[ref] is None:
            return True  # no test asked for (or the reference diverged): any gain
        wins, losses = int((hits[i] & ~hits[ref]).sum()), int((~hits[i] & hits[ref]).sum())
        probes[i][label] = round(paired_z(wins, losses), 3)
        return probes[i][label] > z_min

    recipe_pair = [i for i, p in enumerate(probes) if p["pair"] == 0]  # in factor order
    own = recipe_pair[0]
    rival = max(recipe_pair[1:], key=key, default=None)  # ties: the earlier factor
    if rival is not None and beats(rival, own, "z_against_first_factor"):
        own = rival
    others = [i for i, p in enumerate(probes) if p["pair"] != 0]
    if not others:
        return own
    alt = max(others, key=key)
    return alt if beats(alt, own, "z_against_recipe_pair") else own


def _distill_pairs(run) -> list[tuple[float, float]]:
    """The recipe's (alpha, temperature), then the distinct pairs of ``finetune.distill_probe``
    (none without distillation)."""
    pairs = [(run.distill.alpha, run.distill.temperature)]
    if run.teacher is None or run.cfg.distill is None:
        return pairs
    for alt in run.cfg.distill_probe:
        if (alt.alpha, alt.temperature) not in pairs:
            pairs.append((alt.alpha, alt.temperature))
    return pairs


def _pair_text(alpha: float, temperature: float) -> str:
    return f"alpha {alpha:g}, T {temperature:g}"


def apply_lr_rule(run) -> None:
    """Put a resolved (or resumed) rule into effect: the peak lr and the distillation it chose."""
    run.peak_lr = scaled_lr(run.lr_rule["lr"], run.data.batch_size * run.info.world_size)
    chosen = run.lr_rule.get("distill")
    if chosen and run.cfg.distill is not None:
        run.distill = run.cfg.distill.model_copy(
            update={"alpha": chosen["alpha"], "temperature": chosen["temperature"]}
        )


def _probe(
    run, step_fn: Callable, rule: dict, what: Optional[str] = None
) -> tuple[dict, Optional[torch.Tensor]]:
    """A short fine-tune at ``rule['lr']`` (with ``run.distill``) from the start, scored on the
    held-out images: its scores, and its per-image hits (None if it diverged). The model, the
    optimizer and the scaler are put back as they were."""
    start_state = copy.deepcopy(run.model.state_dict())
    optimizer, scaler = run.optimizer, run.scaler
    peak = scaled_lr(rule["lr"], run.data.batch_size * run.info.world_size)
    run.optimizer = build_optimizer(run.model, run.cfg, peak)
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)
    steps = probe_steps(run.total_steps)
    # the epoch after the last one: a stream of batches and augmentations the fine-tune never uses,
    # the same for every factor
    probe_epoch = run.cfg.epochs
    seed = epoch_seed(run.seed, probe_epoch, run.info.rank)
    seed_everything(seed)
    run.sampler.set_epoch(probe_epoch)
    run.train_loader.generator.manual_seed(seed)
    run.train_model.train()
    loss_sum = torch.zeros(1, dtype=torch.float64, device=run.device)
    try:
        what = what or f"lr {rule['factor']:.3g}x"
        label = f"{run.description} probe {what}"
        with bar(run.progress and run.info.is_main, label, steps) as task:
            done = 0
            while done < steps:  # a probe longer than an epoch goes round again
                for x, y in iterate_batches(run.train_loader):
                    if done >= steps:
                        break
                    loss, _ = step_fn(run, x, y, lr_at_step(done, peak, steps, 0))
                    loss_sum += loss.detach().double()
                    done += 1
                    task.advance()
        finite = math.isfinite(float(all_reduce_sum(loss_sum, run.info)))
        res = run.score(run.holdout.loader, per_image=True) if finite else {"top1": 0.0, "loss": math.inf}
    finally:
        run.model.load_state_dict(start_state)
        run.optimizer, run.scaler = optimizer, scaler
    run.say(
        f"{run.description}: probe {what} (lr {rule['lr']:.4g}): {res['top1']:.2f}% on the "
        f"held-out images after {steps} steps" + ("" if finite else " (diverged)")
    )
    correct = res.get("correct")
    return {
        "what": what,
        "factor": rule["factor"],
        "lr": rule["lr"],
        "steps": steps,
        "holdout_top1": res["top1"],
        "holdout_loss": res["loss"],
    }, (None if correct is None else correct.detach().to("cpu", torch.bool))
