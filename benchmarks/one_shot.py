"""One-shot accuracy of every selection criterion at one MACs budget, on a trained base model.

    python benchmarks/one_shot.py --base runs/demo/base.pt --recipe configs/demo.yaml [--budget 50%]
        [--criteria greedy,greedy-loss,l1,bn,random,uniform] [--finetune-epochs 0] [--quick]

For each criterion: compress the base model to the budget (same units, same surgery, same
calibration images), score top-1 on the validation split with and without BatchNorm
re-calibration, optionally fine-tune (same schedule and distillation for every criterion)
and score again. Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="trained base checkpoint (gslim train)")
    ap.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--budget", default="50%", help="MACs budget, e.g. 50%%")
    ap.add_argument("--criteria", default="greedy,greedy-loss,l1,bn,random,uniform")
    ap.add_argument("--val-images", type=int, default=None, help="score on the first N validation images")
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--finetune-images", type=int, default=None, help="fine-tune on the first N train images")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 calibration / 500 val images")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/results/one_shot"))
    args = ap.parse_args()

    from gslim.compress.calibrate import recalibrate_bn, split_batches
    from gslim.compress.select import compress_model
    from gslim.data import calibration_batch
    from gslim.models import ModelSpec, count_macs_params, load_model
    from gslim.recipe import load_recipe
    from gslim.train import evaluate_on_recipe, fit

    torch.set_flush_denormal(True)
    overrides = {"compress.target_macs": args.budget, "compress.eps": None}
    if args.quick:
        overrides.update({"data.calib_images": 256, "data.val_images": 500})
    if args.val_images:
        overrides["data.val_images"] = args.val_images
    recipe = load_recipe(args.recipe, overrides)
    base, spec = load_model(args.base)
    size = spec.input_size
    x, y = calibration_batch(recipe.data, size, spec.num_classes, recipe.seed)
    base_top1 = evaluate_on_recipe(base, recipe)["top1"]
    base_macs, _ = count_macs_params(base, size)
    rows = []
    for crit in args.criteria.split(","):
        cfg = recipe.compress.model_copy(update={"criterion": crit, "bn_recalib": False})
        t0 = time.perf_counter()
        res = compress_model(base, size, x, y, cfg, seed=recipe.seed, batch_size=128)
        seconds = time.perf_counter() - t0
        raw = evaluate_on_recipe(res.model, recipe)["top1"]
        recal = copy.deepcopy(res.model)
        recalibrate_bn(recal, split_batches(x, 128))
        rec = evaluate_on_recipe(recal, recipe)["top1"]
        macs, params = count_macs_params(recal, size)
        row = {
            "criterion": crit,
            "macs_fraction": macs / base_macs,
            "params": params,
            "select_s": seconds,
            "one_shot_top1": raw,
            "one_shot_top1_bn_recal": rec,
        }
        if args.finetune_epochs:
            ft = recipe.finetune.model_copy(update={"epochs": args.finetune_epochs})
            data = recipe.data.model_copy(update={"train_images": args.finetune_images})
            out = args.work_dir / crit
            r = fit(
                recal,
                ModelSpec(spec.arch, spec.num_classes, size, widths=res.widths),
                ft,
                data,
                out,
                seed=recipe.seed,
                teacher=base,
                force=True,
                output_name="finetuned.pt",
                progress=False,
                quiet=True,
            )
            row["finetuned_top1"] = r.metrics.get("val_top1")
        rows.append(row)
        print(json.dumps(row), flush=True)

    head = ["criterion", "MACs", "params", "select s", "one-shot top-1", "+ BN recal"]
    if args.finetune_epochs:
        head.append(f"after {args.finetune_epochs} ep fine-tune")
    print(f"\nbase {spec.arch}: top-1 {base_top1:.2f}%, budget {args.budget} of {base_macs:,} MACs\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["criterion"],
            f"{100 * r['macs_fraction']:.1f}%",
            f"{r['params']:,}",
            f"{r['select_s']:.1f}",
            f"{r['one_shot_top1']:.2f}",
            f"{r['one_shot_top1_bn_recal']:.2f}",
        ]
        if args.finetune_epochs:
            cells.append(f"{r.get('finetuned_top1', float('nan')):.2f}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"base_top1": base_top1, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
