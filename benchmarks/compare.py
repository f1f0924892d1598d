"""Side-by-side: gslim's selection criteria against Torch-Pruning, at equal fvcore MACs.

    python benchmarks/compare.py                       # the full table (see BENCHMARKS.md)
    python benchmarks/compare.py --quick --out /tmp/q  # smoke run (< 90 s on one core)

For every base model (``--archs``, Fashion-MNIST 32x32, recipe ``configs/demo.yaml`` with
``model.arch`` overridden), every MACs budget (``--budgets``, a fraction of the base model's
fvcore MACs) and every method:

* gslim ``greedy``, ``greedy-loss``, ``l1``, ``bn``, ``random``, ``uniform``:
  ``compress_model`` with ``CompressConfig(criterion=..., target_macs=..., round_to=8,
  bn_recalib=False)`` (block-internal channels only, gslim's default scope);
* Torch-Pruning ``tp-magnitude`` (group L2), ``tp-taylor`` (first-order Taylor, gradients of the
  cross-entropy over the calibration images) and ``tp-bn`` (BN scale): ``MetaPruner`` with
  ``round_to=8``, ``global_pruning=False``, the final Linear ignored and everything else in
  its default scope (stem, stage widths, SE, hidden Linears), and its ``pruning_ratio``
  bisected to the smallest ratio whose fvcore MACs are at most the budget;

The base model itself first gets the BatchNorm re-calibration below (it is the reference, the
teacher and what every method selects from). Then the same for all: BatchNorm
re-calibration on the same calibration images, one-shot
top-1, the same short distillation fine-tune (``gslim.train.fit``, identical FinetuneConfig,
the base model as teacher, ``--finetune-images`` images' worth of steps over the training set
less the fine-tune's held-out slice, which selects its lr and checkpoint), top-1 again,
ONNX export, and ONNX Runtime CPU latency (1 thread, batch 1), every model of a (base,
budget) group interleaved with its base model in one process (gslim.profiling.measure).

Results are cached per method (``<out>/compare/<arch>/<budget>/<method>/result.json`` and
``model.onnx``) and per latency group, keyed by the settings, so a rerun resumes where an
interrupted one stopped. Base checkpoints live in ``<out>/cache/<arch>.pt``: trained with
the recipe's train section when missing (``--base-epochs`` overrides its epochs), leaving out
the fine-tune's held-out slice as ``gslim train`` does (a slice the base trained on rewards what
it memorised; ``--base-sees-holdout`` trains on it, into ``<arch>.pt``), and with
``--base-sees-holdout`` ``--base-from`` (default: /work/scratch/demo/base.pt, trained with
configs/demo.yaml) is copied as the MobileNetV2 base when it exists.

Writes ``<out>/compare.json``, ``<out>/tradeoff_methods.png`` and prints one markdown table
per (model, budget).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

GSLIM_METHODS = ("greedy", "greedy-loss", "l1", "bn", "random", "uniform")
TP_METHODS = ("tp-magnitude", "tp-taylor", "tp-bn")
ALL_METHODS = GSLIM_METHODS + TP_METHODS
QUICK_METHODS = ("greedy", "l1", "tp-magnitude")
DEFAULT_ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18")
DEMO_BASE = Path("/work/scratch/demo/base.pt")
RESULT_VERSION = 1


# ------------------------------------------------------------------------------------------ args


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--recipe", type=Path, default=Path("configs/demo.yaml"), help="recipe (data, train, finetune)"
    )
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated torchvision archs")
    ap.add_argument("--budgets", default="50%,30%", help="MACs budgets, fractions of the base model's MACs")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)}")
    ap.add_argument("--calib-images", type=int, default=2048, help="calibration images (selection, BN recal)")
    ap.add_argument("--val-images", type=int, default=2000, help="score on the first N validation images")
    ap.add_argument(
        "--finetune-images",
        type=int,
        default=4000,
        help="fine-tune for N images' worth of steps (a seeded stream over the training set less the "
        "held-out slice)",
    )
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="fine-tune peak lr at batch 256 (default: the recipe's finetune.lr); use with --tag",
    )
    ap.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the recipe's finetune section for every method (repeatable; value as "
        "YAML), e.g. holdout_confidence=0; use with --tag",
    )
    ap.add_argument(
        "--finetune-steps", type=int, default=None, help="cap fine-tune steps per epoch (smoke runs)"
    )
    ap.add_argument(
        "--base-epochs",
        type=int,
        default=None,
        help="epochs for base models trained here (default: the recipe's train.epochs)",
    )
    ap.add_argument(
        "--base-sees-holdout",
        action="store_true",
        help="train bases on the fine-tune's held-out slice too (the cache of earlier versions)",
    )
    ap.add_argument(
        "--base-from",
        type=Path,
        default=DEMO_BASE,
        help="MobileNetV2 base to copy into the cache when it exists (trained with configs/demo.yaml)",
    )
    ap.add_argument(
        "--loss-batch",
        type=int,
        default=None,
        help="greedy-loss: images scoring each candidate (default: gslim's compress.loss_batch)",
    )
    ap.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset (<=17: TorchScript exporter, ~0.5 s a model; 18+: dynamo, ~10 s)",
    )
    ap.add_argument("--latency-seconds", type=float, default=2.0, help="timed seconds per model (pooled)")
    ap.add_argument("--latency-rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    ap.add_argument(
        "--tag",
        default=None,
        help="a variant's name: results go to <out>/compare-<tag>/ and compare-<tag>.json (bases shared)",
    )
    ap.add_argument("--force", action="store_true", help="ignore cached per-method results")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: mobilenet_v2 trained a few steps on synthetic data, 50%% only, "
        f"{','.join(QUICK_METHODS)}, 128 calibration / 300 val images, 3 fine-tune steps",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.archs = "mobilenet_v2"
        args.budgets = "50%"
        if args.methods == ",".join(ALL_METHODS):
            args.methods = ",".join(QUICK_METHODS)
        args.calib_images, args.val_images, args.finetune_images = 128, 300, 256
        args.finetune_steps = 3
        args.latency_seconds, args.latency_rounds = 0.1, 2
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
    return args


def run_name(args: argparse.Namespace) -> str:
    """compare, compare-<tag>, compare_quick: the results directory and JSON name."""
    if args.quick:
        return "compare_quick" + (f"-{args.tag}" if args.tag else "")
    return "compare" + (f"-{args.tag}" if args.tag else "")


def budget_fraction(text: str) -> float:
    from gslim.recipe import parse_budget

    v = parse_budget(text)
    if not 0 < v <= 1:
        raise SystemExit(f"budget {text!r} must be a fraction of the base model (e.g. 50%)")
    return float(v)


def tp_available() -> tuple[bool, str]:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False, "torch_pruning is not installed (pip install 'gslim[bench]' or torch-pruning==1.6.1)"
    return True, ""


# ------------------------------------------------------------------------------------------ data


class Context:
    """Per-run state: recipe, data, the shared validation loader."""

    def __init__(self, args: argparse.Namespace):
        from gslim.recipe import load_recipe

        self.args = args
        self.out = args.out
        overrides: dict[str, Any] = {
            "data.calib_images": args.calib_images,
            "data.val_images": args.val_images,
            "data.workers": 0,
            "compress.eps": None,
        }
        if args.quick:
            overrides.update(
                {
                    "data.kind": "synthetic",
                    "data.synthetic_train": 512,
                    "data.synthetic_val": args.val_images,
                    "data.batch_size": 64,
                }
            )
        self.recipe_overrides = overrides
        self.base_recipe = load_recipe(args.recipe, overrides)

    def recipe_for(self, arch: str):
        from gslim.recipe import load_recipe

        return load_recipe(self.args.recipe, {**self.recipe_overrides, "model.arch": arch})


def val_loader(recipe):
    from gslim.data import make_dataset, make_loader

    ds = make_dataset(recipe.data, "val", recipe.model.input_size, recipe.model.num_classes, recipe.seed)
    return make_loader(
        ds, recipe.data.eval_batch_size or 2 * recipe.data.batch_size, shuffle=False, workers=0
    )


def top1(model: nn.Module, loader) -> float:
    from gslim.train import evaluate

    return float(evaluate(model, loader, "cpu")["top1"])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ base models


def ensure_base(ctx: Context, arch: str, recipe) -> tuple[nn.Module, Any, dict]:
    """The cached base checkpoint of ``arch`` (copied or trained when missing) and its provenance."""
    from gslim.artifacts import atomic_write
    from gslim.models import ModelSpec, build_architecture, load_model
    from gslim.train import fit

    cache = ctx.out / ("quick/cache" if ctx.args.quick else "cache")  # a quick base never replaces a real one
    cache.mkdir(parents=True, exist_ok=True)
    reserve = 0 if ctx.args.base_sees_holdout else recipe.finetune.holdout_images
    stem = arch if reserve == 0 else f"{arch}-reserved{reserve}"
    path = cache / f"{stem}.pt"
    meta_path = cache / f"{stem}.json"
    if not path.is_file():
        if (
            reserve == 0
            and arch == "mobilenet_v2"
            and ctx.args.base_from
            and Path(ctx.args.base_from).is_file()
            and not ctx.args.quick
        ):
            atomic_write(path, lambda tmp: shutil.copyfile(ctx.args.base_from, tmp))
            meta = {"source": f"copied from {ctx.args.base_from}", "train": "configs/demo.yaml (3 epochs)"}
        else:
            train_cfg = recipe.train
            if train_cfg is None:
                raise SystemExit(f"{ctx.args.recipe} has no train section to train a {arch} base")
            updates: dict[str, Any] = {"device": "cpu"}
            if ctx.args.base_epochs is not None:
                updates["epochs"] = ctx.args.base_epochs
            if ctx.args.quick:
                updates.update({"epochs": 2, "max_steps_per_epoch": 8})
            train_cfg = train_cfg.model_copy(update=updates)
            data = recipe.data.model_copy(update={"train_images": None})
            spec = ModelSpec(arch, recipe.model.num_classes, recipe.model.input_size)
            torch.manual_seed(recipe.seed)
            model = build_architecture(arch, recipe.model.num_classes)
            run_dir = cache / f"train_{stem}"
            log(
                f"[{arch}] training the base model: {train_cfg.epochs} epoch(s) of the recipe's train section"
            )
            t0 = time.perf_counter()
            res = fit(
                model,
                spec,
                train_cfg,
                data,
                run_dir,
                seed=recipe.seed,
                resume=True,
                output_name="model.pt",
                progress=False,
                quiet=ctx.args.quick,
                reserve_holdout=reserve,
            )
            # a temporary file of its own: finetune_streams.py's two children may build this base
            # at once, and a shared "path.tmp" was renamed away under the second (CI, 2026-12-05)
            atomic_write(path, lambda tmp: shutil.copyfile(res.final_path, tmp))
            meta = {
                "source": "trained by benchmarks/compare.py",
                "train": f"{ctx.args.recipe} train section, "
                f"{train_cfg.epochs} epoch(s)" + (", at most 8 steps each" if ctx.args.quick else ""),
                "reserved_holdout_images": reserve,
                "train_seconds": round(time.perf_counter() - t0, 1),
                "val_top1_full": res.metrics.get("val_top1"),
            }
        meta_path.write_text(json.dumps(meta, indent=2))
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"source": "cache"}
    model, spec = load_model(path)
    if spec.arch != arch or spec.input_size != recipe.model.input_size:
        raise SystemExit(
            f"{path} holds a {spec.arch} at {spec.input_size}px, expected {arch} at "
            f"{recipe.model.input_size}px; remove it"
        )
    meta["digest"] = file_digest(path)
    return model.eval(), spec, meta


# ------------------------------------------------------------------------------------------ Torch-Pruning


def final_linear(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise SystemExit("no final Linear to protect from Torch-Pruning")
    return last


def taylor_grads(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy over the calibration images (eval-mode BN)."""
    m = copy.deepcopy(base).eval()
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    n = x.shape[0]
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        loss = F.cross_entropy(m(xb), yb) * (xb.shape[0] / n)
        loss.backward()
    return {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}


def tp_prune(
    base: nn.Module,
    method: str,
    size: int,
    x: torch.Tensor,
    y: torch.Tensor,
    target: float,
    round_to: int,
    batch_size: int,
) -> tuple[nn.Module, dict]:
    """Torch-Pruning at the smallest uniform pruning ratio whose fvcore MACs are <= target."""
    import torch_pruning as tp

    from gslim.models import count_macs_params

    t_search = time.perf_counter()
    grads, grad_s = None, 0.0
    if method == "tp-taylor":
        t0 = time.perf_counter()
        grads = taylor_grads(base, x, y, batch_size)
        grad_s = time.perf_counter() - t0

    def importance():
        if method == "tp-magnitude":
            return tp.importance.MagnitudeImportance(p=2)
        if method == "tp-taylor":
            return tp.importance.TaylorImportance()
        return tp.importance.BNScaleImportance()

    def prune_at(ratio: float) -> tuple[nn.Module, int, float]:
        m = copy.deepcopy(base).eval()
        for name, p in m.named_parameters():
            p.requires_grad_(True)
            p.grad = grads[name].clone() if grads is not None and name in grads else None
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                m,
                torch.zeros(1, 3, size, size),
                importance=importance(),
                pruning_ratio=ratio,
                ignored_layers=[final_linear(m)],
                round_to=round_to,
                global_pruning=False,
            )
            pruner.step()
        dt = time.perf_counter() - t0
        for p in m.parameters():
            p.grad = None
        macs, _ = count_macs_params(m, size)
        return m, macs, dt

    # MACs fall as the ratio rises, except near 1 where Torch-Pruning leaves alone a group that
    # rounding would empty: find a ratio that meets the target from below, then bisect under it
    trials = []
    lo, hi, best = 0.0, None, None
    for r in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9):
        cand = prune_at(r)
        trials.append((r, cand[1]))
        if cand[1] <= target:
            hi, best = r, cand
            break
        lo = r
    if best is None:
        raise RuntimeError(
            f"{method}: no pruning ratio up to 0.9 brings MACs to the target {target:,.0f} (trials: {trials})"
        )
    best_ratio = hi
    while hi - lo > 2e-3:
        mid = (lo + hi) / 2
        cand = prune_at(mid)
        trials.append((mid, cand[1]))
        if cand[1] <= target:
            hi, best, best_ratio = mid, cand, mid
        else:
            lo = mid
    model, macs, prune_s = best
    info = {
        "pruning_ratio": best_ratio,
        "select_s": grad_s + prune_s,
        "gradient_s": grad_s,
        "search_s": time.perf_counter() - t_search,
        "search_trials": len(trials),
    }
    return model, info


# ------------------------------------------------------------------------------------------ one method


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and Linear (to compare width allocations across methods)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def settings_key(ctx: Context, arch: str, budget: str, base_digest: str) -> dict:
    a = ctx.args
    return {
        "version": RESULT_VERSION,
        "base_bn_recal": True,
        "arch": arch,
        "budget": budget,
        "base": base_digest,
        "calib_images": a.calib_images,
        "val_images": a.val_images,
        "finetune_images": a.finetune_images,
        "finetune_epochs": a.finetune_epochs,
        "finetune_steps": a.finetune_steps,
        "base_sees_holdout": a.base_sees_holdout,
        "loss_batch": a.loss_batch,
        "opset": a.opset,
        "quick": a.quick,
        "recipe": str(a.recipe),
        **({"finetune_lr": a.finetune_lr} if a.finetune_lr is not None else {}),
        **({"finetune_set": sorted(a.finetune_set)} if a.finetune_set else {}),
        # gslim's fine-tune defaults (lr rule, held-out selection): a change of them reruns the fine-tunes
        "finetune_defaults": _finetune_defaults(),
        # gslim's compress defaults (ridge, ...): a change of defaults invalidates the cache
        "compress_defaults": _compress_defaults(),
    }


def _finetune_defaults() -> dict:
    from gslim.recipe import FinetuneConfig
    from gslim.train import finetune_lr

    d = FinetuneConfig().model_dump(mode="json")
    rule = {"PROBE_FRACTION": finetune_lr.PROBE_FRACTION, "PROBE_WHOLE_STEPS": finetune_lr.PROBE_WHOLE_STEPS}
    keys = [k for k in sorted(d) if k.startswith(("holdout", "lr"))]
    return {**{k: d[k] for k in keys}, "lr_rule": rule}


def finetune_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--finetune-set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _compress_defaults() -> dict:
    from gslim.recipe import CompressConfig

    d = CompressConfig().model_dump(mode="json")
    return {
        k: d[k]
        for k in sorted(d)
        if k not in ("criterion", "eps", "target_macs", "target_params", "round_to", "bn_recalib", "seed")
    }


def run_method(
    ctx: Context,
    method: str,
    arch: str,
    budget: str,
    base: nn.Module,
    spec,
    recipe,
    x: torch.Tensor,
    y: torch.Tensor,
    loader,
    key: dict,
    work: Path,
) -> dict:
    from gslim.compress.calibrate import recalibrate_bn, split_batches
    from gslim.compress.select import compress_model
    from gslim.compress.stage import base_training_lr
    from gslim.export.onnx import export_onnx
    from gslim.models import ModelSpec, count_macs_params
    from gslim.train import fit

    a = ctx.args
    size, nc = spec.input_size, spec.num_classes
    frac = budget_fraction(budget)
    base_macs, _ = count_macs_params(base, size)
    target = frac * base_macs
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"arch": arch, "budget": budget, "method": method, "target_macs": target}
    t_all = time.perf_counter()
    if method in GSLIM_METHODS:
        cfg = recipe.compress.model_copy(
            update={"criterion": method, "target_macs": frac, "round_to": 8, "bn_recalib": False, "eps": None}
        )
        if method == "greedy-loss" and a.loss_batch is not None:
            cfg = cfg.model_copy(update={"loss_batch": a.loss_batch})
        res = compress_model(base, size, x, y, cfg, seed=recipe.seed, batch_size=128)
        model, widths = res.model, res.widths
        row.update(
            {
                "select_s": res.seconds,
                "library": "gslim",
                "eps": res.eps,
                "keep_ratio": res.keep_ratio,
                "planned_fraction": (res.budget or {}).get("planned_fraction"),
            }
        )
        (work / "selection.json").write_text(json.dumps(res.to_json(), indent=1))
        row["rel_errors"] = {u.name: u.rel_error for u in res.units if u.rel_error is not None}
        row["unit_widths"] = {u.name: [u.kept, u.width] for u in res.units}
    else:
        model, info = tp_prune(base, method, size, x, y, target, 8, 128)
        widths = None
        row.update(info)
        row["library"] = "torch-pruning"
    macs, params = count_macs_params(model, size)
    row.update(
        {"macs": macs, "params": params, "macs_fraction": macs / base_macs, "conv_widths": conv_widths(model)}
    )
    row["one_shot_top1_no_recal"] = top1(model, loader)
    batches = split_batches(x, 128)
    recalibrate_bn(model, batches)
    row["one_shot_top1"] = top1(model, loader)
    log(
        f"  [{arch} {budget} {method}] MACs {100 * macs / base_macs:.1f}%  select {row['select_s']:.1f} s  "
        f"one-shot {row['one_shot_top1']:.2f}% (no recal {row['one_shot_top1_no_recal']:.2f}%)"
    )

    # the same fine-tune for every method; the teacher is a private copy (fit freezes it in place)
    for p in model.parameters():
        p.requires_grad_(True)
    ft = recipe.finetune.model_copy(
        update={
            "epochs": a.finetune_epochs,
            "device": "cpu",
            "max_steps_per_epoch": a.finetune_steps
            or max(1, math.ceil(a.finetune_images / recipe.data.batch_size)),
            "lr": a.finetune_lr or recipe.finetune.lr,
            **finetune_overrides(a.finetune_set),
        }
    )
    ft = type(ft).model_validate(ft.model_dump())  # the overrides validated like a recipe's
    # the whole training set, as the fine-tune of gslim run sees it: its held-out slice is then the
    # one the base was trained without; the steps are capped to --finetune-images images
    data = recipe.data.model_copy(update={"train_images": None})
    ft_spec = ModelSpec(
        arch,
        nc,
        size,
        widths=widths or None,
        meta={
            "compare": {
                "method": method,
                "budget": budget,
                "note": None
                if method in GSLIM_METHODS
                else "Torch-Pruning model: this checkpoint's spec cannot rebuild it; "
                "use model.onnx or the state dict with the pruned module",
            }
        },
    )
    t0 = time.perf_counter()
    r = fit(
        model,
        ft_spec,
        ft,
        data,
        work / "finetune",
        seed=recipe.seed,
        teacher=copy.deepcopy(base),
        force=True,
        output_name="finetuned.pt",
        progress=False,
        quiet=True,
        lr_reference=base_training_lr(spec.meta, recipe),
    )
    sel = r.metrics.get("selection") or {}
    row["finetune_kept"] = "start" if sel.get("kept_start") else (sel.get("kept") or {}).get("step")
    row["finetune_lr"] = (sel.get("lr") or {}).get("lr", ft.lr)
    row["finetune_s"] = time.perf_counter() - t0
    row["finetuned_top1"] = float(r.metrics["val_top1"])
    export_onnx(model.eval(), size, work / "model.onnx", opset=a.opset, dynamic_batch=True)
    row["total_s"] = time.perf_counter() - t_all
    row["settings"] = key
    log(
        f"  [{arch} {budget} {method}] fine-tuned {row['finetuned_top1']:.2f}%  ({row['finetune_s']:.0f} s; "
        f"method total {row['total_s']:.0f} s)"
    )
    atomic_json(work / "result.json", row)
    return row


# ------------------------------------------------------------------------------------------ latency


def ort_cpu_interleaved(files: dict, size: int, threads: int, seconds: float, rounds: int):
    """ORT CPU samples at batch 1 of every file, timed interleaved in this process; also the device
    description and the settings used."""
    from gslim.profiling.measure import MeasureSettings, measure_interleaved
    from gslim.runtime import BackendOptions, OrtCPU

    settings = MeasureSettings(
        warmup_s=max(0.1, seconds / 4), min_iters=10 * rounds, min_seconds=seconds, rounds=rounds
    )
    opts = BackendOptions(threads=threads, input_size=size)
    with contextlib.ExitStack() as stack:
        runners = {}
        for key, path in files.items():
            runner = stack.enter_context(OrtCPU(path, opts))
            runner.prepare(1)
            runners[key] = runner
        samples = measure_interleaved(runners, settings)
        device = next(iter(runners.values())).describe()["device"]
    return samples, device, settings


def measure_group(ctx: Context, base_onnx: Path, onnx_files: dict[str, Path], size: int) -> dict:
    """ORT CPU latency, batch 1, of the base and every method of a group, interleaved in this process."""
    from gslim.profiling.measure import speedup, summarize

    a = ctx.args
    samples, device, settings = ort_cpu_interleaved(
        {"base": base_onnx, **onnx_files}, size, a.threads, a.latency_seconds, a.latency_rounds
    )
    out = {"device": device, "settings": settings.__dict__, "models": {}}
    for k, s in samples.items():
        stats = summarize(s.primary, batch=1)
        if k != "base":
            stats.update(speedup(samples["base"], s))
        out["models"][k] = stats
    return out


# ------------------------------------------------------------------------------------------ output


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


def atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_tables(report: dict) -> str:
    lines = []
    for arch, b in report["bases"].items():
        for budget in report["budgets"]:
            rows = [r for r in report["rows"] if r["arch"] == arch and r["budget"] == budget]
            if not rows:
                continue
            lat = report["latency"].get(f"{arch}/{budget}", {}).get("models", {})
            base_lat = lat.get("base", {}).get("median_ms")
            lines.append(
                f"\n**{arch}**, budget {budget} of {b['macs']:,} MACs — base top-1 {b['top1']:.2f}%, "
                f"{b['params']:,} params, ORT {fmt(base_lat, '.3f')} ms\n"
            )
            head = [
                "method",
                "MACs",
                "params",
                "select s",
                "one-shot top-1",
                "(no BN recal)",
                "fine-tuned top-1",
                "ORT ms",
                "speedup",
            ]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|---|" + "---:|" * (len(head) - 1))
            best_os = max(r["one_shot_top1"] for r in rows)
            best_ft = max(r["finetuned_top1"] for r in rows)
            for r in rows:
                m = lat.get(r["method"], {})
                os_ = fmt(r["one_shot_top1"])
                ft = fmt(r["finetuned_top1"])
                if r["one_shot_top1"] == best_os:
                    os_ = f"**{os_}**"
                if r["finetuned_top1"] == best_ft:
                    ft = f"**{ft}**"
                cells = [
                    r["method"],
                    f"{100 * r['macs_fraction']:.1f}%",
                    f"{r['params'] / 1e6:.2f}M",
                    fmt(r["select_s"], ".1f"),
                    os_,
                    fmt(r["one_shot_top1_no_recal"]),
                    ft,
                    fmt(m.get("median_ms"), ".3f"),
                    fmt(m.get("speedup"), ".2f") + "x" if m else "—",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(report["bases"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 4.4), squeeze=False)
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in report["rows"])]
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    markers = ["o", "s", "^", "D", "v"]
    for ax, arch in zip(axes[0], archs):
        base = report["bases"][arch]
        for bi, budget in enumerate(report["budgets"]):
            lat = report["latency"].get(f"{arch}/{budget}", {}).get("models", {})
            for m in methods:
                row = next(
                    (
                        r
                        for r in report["rows"]
                        if r["arch"] == arch and r["budget"] == budget and r["method"] == m
                    ),
                    None,
                )
                if row is None or m not in lat:
                    continue
                ax.scatter(
                    lat[m]["median_ms"],
                    row["finetuned_top1"],
                    color=colors[m],
                    marker=markers[bi % len(markers)],
                    s=46 if m == "greedy" else 30,
                    edgecolors="black" if m == "greedy" else "none",
                    label=f"{m}" if bi == 0 else None,
                    zorder=3,
                )
            if "base" in lat:
                ax.scatter(
                    lat["base"]["median_ms"],
                    base["top1"],
                    color="black",
                    marker="*",
                    s=120,
                    label="base" if bi == 0 else None,
                    zorder=4,
                )
        ax.set_title(
            f"{arch} (o: {report['budgets'][0]}"
            + (f", ■: {report['budgets'][1]}" if len(report["budgets"]) > 1 else "")
            + " MACs)"
        )
        ax.set_xlabel("ONNX Runtime CPU latency, batch 1, 1 thread (ms, median)")
        ax.set_ylabel("top-1 after fine-tune (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 10), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", category=UserWarning)
    from gslim.compress.calibrate import recalibrate_bn, split_batches
    from gslim.data import calibration_batch
    from gslim.environment import environment_info
    from gslim.export.onnx import export_onnx
    from gslim.models import count_macs_params

    ok, why = tp_available()
    methods = list(args.methods)
    skipped_methods = {}
    if not ok:
        for m in [m for m in methods if m in TP_METHODS]:
            skipped_methods[m] = why
        methods = [m for m in methods if m not in TP_METHODS]
        log(f"skipping {', '.join(skipped_methods) or 'no'} Torch-Pruning methods: {why}")
    ctx = Context(args)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": environment_info("cpu"),
        "torch_pruning": _tp_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "budgets": args.budgets,
        "methods": methods,
        "skipped_methods": skipped_methods,
        "bases": {},
        "rows": [],
        "latency": {},
        "failures": [],
    }
    for arch in args.archs:
        recipe = ctx.recipe_for(arch)
        base, spec, meta = ensure_base(ctx, arch, recipe)
        size = spec.input_size
        loader = val_loader(recipe)
        base_macs, base_params = count_macs_params(base, size)
        x, y = calibration_batch(recipe.data, size, spec.num_classes, recipe.seed)
        # The base gets the same BatchNorm re-calibration as every compressed model: the reference,
        # the teacher and what every method selects from. (A short training run can leave stale
        # running variances: the 1-epoch MobileNetV3-small base scores 57% without this, 86% with.)
        meta["top1_before_bn_recal"] = top1(base, loader)
        recalibrate_bn(base, split_batches(x, 128))
        base.eval()
        base_top1 = top1(base, loader)
        report["bases"][arch] = {"top1": base_top1, "macs": base_macs, "params": base_params, **meta}
        log(
            f"[{arch}] base top-1 {base_top1:.2f}% on {args.val_images} val images after BN re-calibration "
            f"({meta['top1_before_bn_recal']:.2f}% before), {base_macs:,} MACs ({meta['source']})"
        )
        arch_dir = args.out / run_name(args) / arch
        base_onnx = arch_dir / "base.onnx"
        export_onnx(base, size, base_onnx, opset=args.opset, dynamic_batch=True)
        for budget in args.budgets:
            bdir = arch_dir / budget.replace("%", "pct")
            key = settings_key(ctx, arch, budget, meta["digest"])
            onnx_files = {}
            for method in methods:
                work = bdir / method
                cached = work / "result.json"
                row = None
                if cached.is_file() and (work / "model.onnx").is_file() and not args.force:
                    row = json.loads(cached.read_text())
                    if row.get("settings") != key:
                        row = None
                if row is None:
                    log(f"[{arch} {budget}] {method} ...")
                    try:
                        row = run_method(
                            ctx, method, arch, budget, base, spec, recipe, x, y, loader, key, work
                        )
                    except Exception as exc:  # noqa: BLE001 - one failing method must not sink the table
                        import traceback

                        traceback.print_exc()
                        report["failures"].append(
                            {
                                "arch": arch,
                                "budget": budget,
                                "method": method,
                                "error": f"{type(exc).__name__}: {exc}",
                            }
                        )
                        log(f"[{arch} {budget}] {method} FAILED: {type(exc).__name__}: {exc}")
                        continue
                else:
                    log(f"[{arch} {budget}] {method}: cached ({cached})")
                report["rows"].append(row)
                onnx_files[method] = work / "model.onnx"
            lat_path = bdir / "latency.json"
            lat = json.loads(lat_path.read_text()) if lat_path.is_file() and not args.force else None
            lat_key = {
                "settings": key,
                "methods": list(onnx_files),
                "latency_seconds": args.latency_seconds,
                "rounds": args.latency_rounds,
                "threads": args.threads,
            }
            if lat is None or lat.get("key") != lat_key:
                log(f"[{arch} {budget}] ORT latency: base + {len(onnx_files)} models, interleaved ...")
                lat = measure_group(ctx, base_onnx, onnx_files, size)
                lat["key"] = lat_key
                atomic_json(lat_path, lat)
            report["latency"][f"{arch}/{budget}"] = lat
            atomic_json(args.out / f"{run_name(args)}.json", report)
    report["wall_s"] = time.perf_counter() - t_start
    name = run_name(args)
    atomic_json(args.out / f"{name}.json", report)
    png = args.out / ("tradeoff_methods" + name[len("compare") :] + ".png")
    plot(report, png)
    print(markdown_tables(report))
    for f in report["failures"]:
        print(f"- {f['arch']} {f['budget']} {f['method']} FAILED: {f['error']}")
    if skipped_methods:
        for m, why in skipped_methods.items():
            print(f"- {m} skipped: {why}")
    print(f"\nwrote {args.out / (name + '.json')} and {png} in {report['wall_s']:.0f} s")
    return 0


def _tp_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
