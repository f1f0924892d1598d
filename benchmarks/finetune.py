"""What a fine-tune does to a compressed model: one-shot vs fine-tuned top-1 per fine-tune variant.

    python benchmarks/finetune.py                         # the demo's setting (see BENCHMARKS.md)
    python benchmarks/finetune.py --quick --out /tmp/ftq  # smoke run (synthetic data, seconds)

The base is ``configs/demo.yaml``'s model trained with its train section (cached in
``<out>/cache``). It is compressed once per (criterion, MACs budget) with the recipe's compress
section (``--criteria``: greedy lands near the base, l1 far from it, so both ends of the "how
far is the one-shot model from the base" axis are measured). Each slim model is then
fine-tuned with every variant (``--variants``, each ``name:key=value,...`` over the recipe's
finetune section, values parsed as YAML), always from the same slim weights, with the
same data and seed. Reported per row: one-shot top-1 on the test split, the held-out slice's
scores (start, teacher, and the gap between them), the last checkpoint's test top-1, and the
test top-1 of the checkpoint the held-out selection kept. Results are cached per row in
``<out>/finetune/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

DEFAULT_VARIANTS = ("auto:lr=auto", "lr0.04:lr=0.04", "lr0.01:lr=0.01")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--budgets", nargs="+", default=["70%", "50%", "30%"])
    ap.add_argument("--criteria", nargs="+", default=["greedy", "l1"])
    ap.add_argument(
        "--l1-budgets",
        nargs="+",
        default=["30%"],
        help="budgets for criteria other than greedy (slow to run all)",
    )
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--seed", type=int, default=None, help="recipe seed (default: the recipe's)")
    ap.add_argument("--quick", action="store_true", help="synthetic data, a few steps: a smoke run")
    return ap.parse_args(argv)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition(":")
    updates: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        updates[key.strip()] = yaml.safe_load(value)
    return name, updates


def with_updates(section: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """The section as a dict with ``updates`` applied; a dotted key reaches into a subsection
    (``distill.alpha=0.9``; ``distill=null`` turns distillation off)."""
    out = section.model_dump()
    for key, value in updates.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(args: argparse.Namespace):
    from gslim.recipe import load_recipe

    overrides: dict[str, Any] = {"data.workers": 0, "train.device": "cpu", "finetune.device": "cpu"}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.quick:
        overrides.update(
            {
                "data.kind": "synthetic",
                "data.synthetic_train": 1024,
                "data.synthetic_val": 256,
                "data.batch_size": 64,
                "data.calib_images": 128,
                "train.epochs": 2,
                "train.max_steps_per_epoch": 6,
                "finetune.max_steps_per_epoch": 4,
                "finetune.holdout_images": 128,
            }
        )
    return load_recipe(args.recipe, overrides)


def ensure_base(recipe, cache: Path):
    """The recipe's base model, trained by its train section once and cached."""
    from gslim.models import load_model
    from gslim.train.stage import train_stage

    tag = f"{recipe.model.arch}_{recipe.model.input_size}px_seed{recipe.seed}_e{recipe.train.epochs}"
    # precise BN statistics (gslim.train.precise_bn); the fine-tune's held-out slice left out of training
    tag += f"_pbn{recipe.train.precise_bn_images}_ho{recipe.finetune.holdout_images}"
    run_dir = cache / f"finetune_base_{tag}"
    path = run_dir / "base.pt"
    if not path.is_file():
        log(f"training the base ({recipe.train.epochs} epoch(s)) in {run_dir}")
        train_stage(recipe, run_dir, resume=True, progress=False)
    model, spec = load_model(path)
    return model.eval(), spec, path


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from gslim.compress.stage import compress_stage, finetune_stage
    from gslim.models import load_model
    from gslim.train import evaluate_on_recipe

    recipe = load(args)
    root = args.out / ("quick" if args.quick else "")
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    base, spec, base_path = ensure_base(recipe, cache)
    base_top1 = evaluate_on_recipe(base, recipe)["top1"]
    log(f"base: {base_top1:.2f}% on the test split ({base_path})")
    rows = []
    for criterion in args.criteria:
        budgets = args.budgets if criterion == "greedy" else args.l1_budgets
        for budget in budgets:
            c_recipe = recipe.model_copy(deep=True)
            c_recipe.compress = recipe.compress.model_copy(
                update={"criterion": criterion, "target_macs": float(budget.rstrip("%")) / 100, "eps": None}
            )
            cdir = root / "finetune" / f"seed{recipe.seed}" / f"{criterion}_{budget.rstrip('%')}"
            slim = cdir / "slim.pt"
            if not slim.is_file():
                compress_stage(c_recipe, cdir, model_path=base_path, progress=False)
            model, _ = load_model(slim)
            one_shot = evaluate_on_recipe(model, recipe)["top1"]
            for text in args.variants:
                name, updates = parse_variant(text)
                vdir = cdir / name
                result_path = vdir / "result.json"
                if result_path.is_file():
                    rows.append(json.loads(result_path.read_text()))
                    continue
                v_recipe = c_recipe.model_copy(deep=True)
                v_recipe.finetune = type(recipe.finetune).model_validate(
                    with_updates(recipe.finetune, updates)
                )
                t0 = time.perf_counter()
                res = finetune_stage(
                    v_recipe, vdir, model_path=slim, teacher_path=base_path, force=True, progress=False
                )
                log_lines = [json.loads(s) for s in (vdir / "finetune_log.jsonl").read_text().splitlines()]
                sel = res["metrics"].get("selection") or {}
                row = {
                    "criterion": criterion,
                    "budget": budget,
                    "variant": name,
                    "updates": updates,
                    "base_top1": base_top1,
                    "one_shot_top1": one_shot,
                    "last_top1": log_lines[-1]["val_top1"],
                    "kept_top1": res["metrics"]["val_top1"],
                    "holdout_start": (sel.get("start") or {}).get("holdout_top1"),
                    "holdout_kept": (sel.get("kept") or {}).get("holdout_top1"),
                    "holdout_teacher": sel.get("teacher_holdout_top1"),
                    "kept_start": sel.get("kept_start"),
                    "kept_step": (sel.get("kept") or {}).get("step"),
                    "lr": (sel.get("lr") or {}).get("lr", v_recipe.finetune.lr),
                    "lr_rule": sel.get("lr"),
                    "seconds": time.perf_counter() - t0,
                }
                vdir.mkdir(parents=True, exist_ok=True)
                tmp = result_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(row, indent=1))
                os.replace(tmp, result_path)
                rows.append(row)
                log(
                    f"[{criterion} {budget} {name}] one-shot {one_shot:.2f}  last {row['last_top1']:.2f}  "
                    f"kept {row['kept_top1']:.2f}  ({row['seconds']:.0f} s)"
                )
    print(table(rows))
    return 0


def _f(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    out = [
        "| criterion | budget | variant | peak lr @256 | one-shot | held-out start / teacher | last ckpt | kept "
        "| kept − one-shot | kept step |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lr = r["lr"].get("peak") if isinstance(r["lr"], dict) else r["lr"]  # rows of an older run: a dict
        out.append(
            f"| {r['criterion']} | {r['budget']} | {r['variant']} | {_f(lr, '.4g')} | {r['one_shot_top1']:.2f} "
            f"| {_f(r['holdout_start'])} / {_f(r['holdout_teacher'])} | {r['last_top1']:.2f} "
            f"| {r['kept_top1']:.2f} | {r['kept_top1'] - r['one_shot_top1']:+.2f} "
            f"| {'start' if r['kept_start'] else r['kept_step']} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
