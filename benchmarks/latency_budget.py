"""Latency budgets measured on the target runtime (ONNX Runtime CPU here): does the compressed
model land on its budget, how well does the latency model predict it, and what does the latency-
aware allocation buy over a MACs budget?

Two parts, each printing a Markdown table (and writing JSON under --out):

``--part speed`` (224x224, batch 1, ``--threads`` threads): for each arch and latency budget
(fractions of the base model's measured latency), ``gslim``'s closed loop (latency table ->
knapsack widths -> greedy selection -> measure -> tighten) is run and reported: the budget, the
measured latency (interleaved with the base), the latency model's prediction and its error, the
speedup and the MAC reduction ratio of the same model, and the speedup per MAC ratio. Then the
same compress is repeated to time the cached second run. Weights are torchvision's random
initialisation (latency does not depend on them) and the calibration images are Fashion-MNIST
upscaled to 224 px.

``--part accuracy`` (trained bases at ``--size`` px on Fashion-MNIST, cached): at each latency
budget, three models of the *same measured latency*: latency-budget greedy (knapsack over the
greedy error curves), MACs-budget greedy (eps search; its MACs target tuned until its measured
latency meets the budget) and Torch-Pruning magnitude round_to=8 (its ratio tuned the same
way); top-1 one-shot and after the same short distillation fine-tune.

    python benchmarks/latency_budget.py --part speed
    python benchmarks/latency_budget.py --part accuracy --archs mobilenet_v2
    python benchmarks/latency_budget.py --part accuracy --archs efficientnet_b0 --size 96 \\
        --macs-weight 0,0.1 --methods latency-greedy   # the allocation's MACs weight, alone
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


METHODS = ("latency-greedy", "macs-greedy", "tp-magnitude r8")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("speed", "accuracy"), required=True)
    ap.add_argument(
        "--archs",
        default=None,
        help="comma-separated (speed: mobilenet_v2,mobilenet_v3_large,resnet18; accuracy: mobilenet_v2)",
    )
    ap.add_argument(
        "--budgets", default="60%,35%", help="latency budgets, fractions of the base's measured latency"
    )
    ap.add_argument("--size", type=int, default=None, help="input size (speed: 224, accuracy: 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-images", type=int, default=None, help="speed: 64, accuracy: 1024")
    ap.add_argument("--grid", type=int, default=8, help="widths timed per unit in the latency table")
    ap.add_argument(
        "--macs-weight",
        default=None,
        help="compress.latency.macs_weight (default: the recipe's); a comma list gives a row per weight "
        "for each budget (speed: run in turn, the cached rerun timed for the first; accuracy: a "
        "latency-greedy model per weight, the others matched to the first's latency)",
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="accuracy: which of the three models to build, comma-separated",
    )
    ap.add_argument("--train-images", type=int, default=12000, help="accuracy: base training subset")
    ap.add_argument("--base-epochs", type=int, default=4, help="accuracy: base training epochs")
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--finetune-images", type=int, default=4000)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"))
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the script (tests)")
    a = ap.parse_args(argv)
    speed = a.part == "speed"
    a.archs = (a.archs or ("mobilenet_v2,mobilenet_v3_large,resnet18" if speed else "mobilenet_v2")).split(
        ","
    )
    a.size = a.size or (224 if speed else 64)
    try:
        a.macs_weights = [None] if a.macs_weight is None else [float(w) for w in a.macs_weight.split(",")]
    except ValueError:
        ap.error(f"--macs-weight: numbers separated by commas (got {a.macs_weight!r})")
    a.methods = a.methods.split(",")
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown or "latency-greedy" not in a.methods:
        ap.error(
            f"--methods: latency-greedy and any of {', '.join(METHODS[1:])} (got {', '.join(a.methods)})"
        )
    a.calib_images = a.calib_images or (64 if speed else 1024)
    if a.quick:
        a.archs = ["mobilenet_v3_small"] if speed else a.archs
        a.budgets = "85%"  # at 32 px the unprunable layers are most of the time
        a.size, a.calib_images, a.grid, a.val_images = 32, 16, 3, 64
        a.train_images, a.base_epochs, a.finetune_images = 256, 1, 128
        a.out = a.out / "quick"
    return a


def fraction(text: str) -> float:
    return float(text.strip().rstrip("%")) / 100


def cpu_name() -> str:
    from gslim.environment import cpu_model

    return cpu_model() or platform.processor()


def recipe_for(a: argparse.Namespace, arch: str, budget: str, macs_weight: Optional[float] = None):
    from gslim.recipe import parse_recipe

    return parse_recipe(
        {
            "name": "latency-bench",
            "seed": 0,
            "model": {"arch": arch, "num_classes": 10, "input_size": a.size},
            "data": {
                "kind": "fashion-mnist",
                "calib_images": a.calib_images,
                "batch_size": 64,
                "val_images": a.val_images,
            },
            "compress": {
                "target_latency": budget,
                "latency": {
                    "backend": "ort-cpu",
                    "threads": a.threads,
                    "batch": 1,
                    "grid": a.grid,
                    "max_rounds": 4,
                    # the smoke run's 32 px models are call-overhead bound: it checks the loop runs
                    "tolerance": 0.5 if a.quick else 0.03,
                    **({} if macs_weight is None else {"macs_weight": macs_weight}),
                },
            },
            "profile": {"threads": a.threads},
        },
        "benchmark",
    )


def compress_at_latency(recipe, model, x, y, batch_size: int = 32):
    """gslim's closed loop (as gslim compress runs it); returns (result, latency info)."""
    from gslim.compress.select import compress_model
    from gslim.compress.stage import compress_to_latency

    def run(latency=None, curves=None):
        return compress_model(
            model,
            recipe.model.input_size,
            x,
            y,
            recipe.compress,
            seed=recipe.seed,
            batch_size=batch_size,
            latency=latency,
            curves=curves,
        )

    return compress_to_latency(recipe, model, recipe.model.input_size, run, say=log)


# ------------------------------------------------------------------------------------------ speed


def part_speed(a: argparse.Namespace) -> list[dict]:
    from gslim.data import calibration_batch
    from gslim.models import build_model, count_macs_params

    rows = []
    for arch in a.archs:
        torch.manual_seed(0)
        base = build_model(arch, 10).eval()
        macs0, _ = count_macs_params(base, a.size)
        data = recipe_for(a, arch, "50%")  # the calibration images do not depend on the budget
        x, y = calibration_batch(data.data, a.size, 10, data.seed)
        for budget in a.budgets.split(","):
            for i, weight in enumerate(a.macs_weights):
                r = recipe_for(a, arch, budget, weight)
                t0 = time.perf_counter()
                res, info = compress_at_latency(r, base, x, y)
                first_s = time.perf_counter() - t0
                second_s = None
                if i == 0:  # the same compress again: the table comes from the cache
                    t0 = time.perf_counter()
                    compress_at_latency(r, base, x, y)
                    second_s = time.perf_counter() - t0
                rows.append(speed_row(arch, budget, r, res, info, macs0, a.size, first_s, second_s))
    return rows


def speed_row(arch, budget, recipe, res, info, macs0, size, first_s, second_s) -> dict:
    from gslim.models import count_macs_params

    macs1, _ = count_macs_params(res.model, size)
    mac_ratio = macs0 / macs1
    row = {
        "arch": arch,
        "budget": budget,
        "macs_weight": recipe.compress.latency.macs_weight,
        "base_ms": info["base_ms"],
        "budget_ms": info["budget_ms"],
        "measured_ms": info["measured_ms"],
        "predicted_ms": info["predicted_ms"],
        "prediction_error": info["prediction_error"],
        "speedup": info["speedup"],
        "mac_ratio": mac_ratio,
        "speedup_per_mac_ratio": info["speedup"] / mac_ratio,
        "rounds": len(info["rounds"]),
        "table_entries": info["table"]["entries"],
        "first_s": first_s,
        "second_s": second_s,
        "measured_now_first": info["table"]["measured_now"],
        "macs_fraction": macs1 / macs0,
    }
    log(
        f"[{arch} {budget}] {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}"
    )
    return row


def speed_table(rows: list[dict], a: argparse.Namespace) -> str:
    out = [
        f"ONNX Runtime CPU, {a.threads} thread(s), batch 1, {a.size}x{a.size}, {cpu_name()}",
        "",
        "| model | budget | macs_weight | base ms | budget ms | measured ms | measured/budget | predicted ms "
        "| prediction error | speedup | MAC ratio | MACs kept | speedup/MAC ratio | rounds | compress s (first / cached) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cached = "—" if r["second_s"] is None else f"{r['second_s']:.0f}"
        out.append(
            f"| {r['arch']} | {r['budget']} | {r['macs_weight']:g} | {r['base_ms']:.2f} | {r['budget_ms']:.2f} | "
            f"{r['measured_ms']:.2f} | {r['measured_ms'] / r['budget_ms']:.3f} | {r['predicted_ms']:.2f} | "
            f"{100 * r['prediction_error']:+.1f}% | {r['speedup']:.2f}x | {r['mac_ratio']:.2f}x | "
            f"{100 * r['macs_fraction']:.1f}% | {r['speedup_per_mac_ratio']:.2f} | {r['rounds']} | "
            f"{r['first_s']:.0f} / {cached} |"
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ accuracy


def trained_base(a: argparse.Namespace, arch: str):
    """A base trained on Fashion-MNIST at --size px (cached under --out/cache)."""
    from gslim.models import ModelSpec, build_architecture, load_model
    from gslim.recipe import parse_recipe
    from gslim.train import fit

    cache = a.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{arch}_{a.size}px.pt"
    if not path.is_file():
        r = parse_recipe(
            {
                "model": {"arch": arch, "num_classes": 10, "input_size": a.size},
                "data": {
                    "kind": "fashion-mnist",
                    "batch_size": 64,
                    "train_images": a.train_images,
                    "val_images": a.val_images,
                },
                "train": {"epochs": a.base_epochs, "lr": 0.4, "warmup_epochs": 0.3, "device": "cpu"},
            }
        )
        torch.manual_seed(0)
        model = build_architecture(arch, 10)
        log(f"[{arch}] training the base: {a.base_epochs} epochs on {a.train_images} images at {a.size} px")
        res = fit(
            model,
            ModelSpec(arch, 10, a.size),
            r.train,
            r.data,
            cache / f"train_{arch}_{a.size}",
            seed=0,
            resume=True,
            output_name="model.pt",
            progress=False,
        )
        os.replace(res.final_path, path)
    model, spec = load_model(path)
    return model.eval(), spec


def match_latency(
    make: Callable[[float], torch.nn.Module],
    base,
    size: int,
    settings,
    target_ms_of,
    start: float,
    tolerance: float = 0.03,
    rounds: int = 4,
) -> tuple[torch.nn.Module, dict]:
    """A MACs-budgeted method at the same *measured* latency: adjust its MACs fraction by
    budget/measured until its latency is within [1 - 5%, 1 + tolerance] of the budget; keep the
    widest that fits."""
    from gslim.compress.latency_table import measure_model

    frac, best, trials = start, None, []
    for _ in range(rounds):
        model = make(frac)
        m = measure_model(model, size, settings, others={"base": base})
        budget = target_ms_of(m["base"])
        trials.append({"macs_target": frac, "measured_ms": m["model"], "budget_ms": budget})
        fits = m["model"] <= budget * (1 + tolerance)
        if fits and (best is None or m["model"] > best[1]["measured_ms"]):
            best = (model, trials[-1])
        if fits and m["model"] >= budget * 0.95:
            break
        frac = min(1.0, frac * budget / m["model"])
    if best is None:
        best = (model, trials[-1])
    return best[0], {**best[1], "trials": trials}


def part_accuracy(a: argparse.Namespace) -> list[dict]:
    from compare import tp_prune

    from gslim.compress.calibrate import recalibrate_bn, split_batches
    from gslim.compress.latency import settings_from_recipe
    from gslim.compress.select import compress_model
    from gslim.data import calibration_batch
    from gslim.models import count_macs_params

    rows = []
    for arch in a.archs:
        base, spec = trained_base(a, arch)
        macs0, _ = count_macs_params(base, a.size)
        data = recipe_for(a, arch, "50%")  # the calibration images do not depend on the budget
        x, y = calibration_batch(data.data, a.size, 10, data.seed)
        for budget in a.budgets.split(","):
            models, first = {}, None
            for weight in a.macs_weights:  # one latency-greedy model per weight, each by the closed loop
                r = recipe_for(a, arch, budget, weight)
                res, info = compress_at_latency(r, base, x, y)
                w = r.compress.latency.macs_weight
                name = "latency-greedy" if len(a.macs_weights) == 1 else f"latency-greedy w={w:g}"
                lat = {"measured_ms": info["measured_ms"], "budget_ms": info["budget_ms"]}
                models[name] = (res.model, {**lat, "rounds": len(info["rounds"]), "macs_weight": w})
                first = first or (r, res, info)
            r, res, info = first
            settings, frac, curves = settings_from_recipe(r), fraction(budget), res.curves
            start = count_macs_params(res.model, a.size)[0] / macs0  # the same MACs, then matched on latency

            def greedy_at(f: float):
                cfg = r.compress.model_copy(
                    update={"target_latency": None, "target_macs": f, "allocation": "eps"}
                )
                return compress_model(base, a.size, x, y, cfg, seed=0, batch_size=32, curves=curves).model

            def tp_at(f: float):
                m, _ = tp_prune(base, "tp-magnitude", a.size, x, y, f * macs0, 8, 64)
                recalibrate_bn(m, split_batches(x, 64))
                return m

            for name, make in (("macs-greedy", greedy_at), ("tp-magnitude r8", tp_at)):
                if name in a.methods:
                    log(f"[{arch} {budget}] {name}: matching the measured latency {info['budget_ms']:.3f} ms")
                    models[name] = match_latency(make, base, a.size, settings, lambda b: frac * b, start)
            for name, (model, lat) in models.items():
                rows.append(evaluate_and_finetune(a, r, arch, budget, name, model, lat, base, macs0))
    return rows


def evaluate_and_finetune(a, recipe, arch, budget, name, model, lat, base, macs0) -> dict:
    """Top-1 one-shot and after the same short distilled fine-tune, for every method."""
    from gslim.models import ModelSpec, count_macs_params
    from gslim.train import evaluate_on_recipe, fit

    row = {
        "arch": arch,
        "budget": budget,
        "method": name,
        **{k: v for k, v in lat.items() if k != "trials"},
        "macs_fraction": count_macs_params(model, a.size)[0] / macs0,
        "trials": lat.get("trials"),
    }
    row["one_shot_top1"] = evaluate_on_recipe(model, recipe, "cpu", limit=a.val_images)["top1"]
    ft = recipe.finetune.model_copy(update={"epochs": a.finetune_epochs, "device": "cpu"})
    data = recipe.data.model_copy(update={"train_images": a.finetune_images})
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    out = a.out / "work" / f"{arch}_{budget.rstrip('%')}_{name.replace(' ', '_').replace('=', '')}"
    fit(
        tuned,
        ModelSpec(arch, 10, a.size),
        ft,
        data,
        out,
        seed=0,
        teacher=copy.deepcopy(base),
        force=True,
        output_name="finetuned.pt",
        progress=False,
        quiet=True,
    )
    row["finetuned_top1"] = evaluate_on_recipe(tuned, recipe, "cpu", limit=a.val_images)["top1"]
    log(
        f"[{arch} {budget} {name}] {row['measured_ms']:.3f} ms (budget {row['budget_ms']:.3f}), MACs "
        f"{100 * row['macs_fraction']:.1f}%, one-shot {row['one_shot_top1']:.2f}%, "
        f"fine-tuned {row['finetuned_top1']:.2f}%"
    )
    return row


def accuracy_table(rows: list[dict], a: argparse.Namespace) -> str:
    out = [
        f"Fashion-MNIST at {a.size}x{a.size}, ONNX Runtime CPU {a.threads} thread(s) batch 1, {cpu_name()}; "
        f"top-1 on {a.val_images} validation images; fine-tune: {a.finetune_epochs} epoch(s) on "
        f"{a.finetune_images} images with distillation, the same for every method",
        "",
        "| model | budget | method | budget ms | measured ms | MACs | one-shot top-1 | fine-tuned top-1 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {r['budget']} | {r['method']} | {r['budget_ms']:.3f} | {r['measured_ms']:.3f} | "
            f"{100 * r['macs_fraction']:.1f}% | {r['one_shot_top1']:.2f}% | {r['finetuned_top1']:.2f}% |"
        )
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GSLIM_CACHE", str(a.out / "cache"))  # the benchmark's own latency tables
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = part_speed(a) if a.part == "speed" else part_accuracy(a)
    table = speed_table(rows, a) if a.part == "speed" else accuracy_table(rows, a)
    result: dict[str, Any] = {
        "part": a.part,
        "args": {k: str(v) for k, v in vars(a).items()},
        "cpu": cpu_name(),
        "rows": rows,
        "table": table,
    }
    path = a.out / f"{a.part}{'_quick' if a.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(table)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
