"""FP32 vs INT8 (Q/DQ ONNX) for base and greedy-compressed models: accuracy and ORT CPU latency.

    python benchmarks/int8.py                      # MobileNetV2 and ResNet-18, 50% and 30% MACs
    python benchmarks/int8.py --quick              # smoke run on synthetic data (the test suite)

For each architecture: the cached Fashion-MNIST base of ``benchmarks/compare.py`` (trained
with the recipe's train section when missing), greedy compression to each MACs budget
(one-shot, BatchNorm re-calibrated, no fine-tune), then for the base and each compressed
model:

* top-1 on the whole validation (test) split at the trained resolution, through ONNX Runtime
  CPU, of the FP32 ONNX and of the INT8 Q/DQ ONNX that ``gslim export --int8`` writes
  (calibrated on the recipe's calibration images, the same seeded subset compress uses);
* ONNX Runtime CPU latency at 224x224 (the same weights: the networks are resolution-agnostic),
  1 thread, batch 1, all files of an architecture timed interleaved in one process.

Each compressed model is also fine-tuned (``--finetune-images``, the recipe's finetune
section: distillation from the base, as ``benchmarks/compare.py`` does) and measured again,
and ``--round-to`` adds the first budget at wider channel alignments (16, 32: does INT8 want
them?), one-shot.

Prints one markdown table per architecture with the CPU's name and whether it has VNNI (the
8-bit dot-product instructions ORT's INT8 kernels use); writes ``int8.json`` next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the cached bases and the recipe context)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--budgets", default="50%,30%")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--val-images", type=int, default=None, help="default: the whole validation split")
    ap.add_argument("--base-epochs", type=int, default=None, help="epochs for a base that must be trained")
    ap.add_argument("--latency-size", type=int, default=224)
    ap.add_argument("--latency-seconds", type=float, default=2.0)
    ap.add_argument("--latency-rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--finetune-images", type=int, default=4000, help="0: no fine-tuned rows")
    ap.add_argument("--round-to", default="16,32", help="extra alignments for the first budget ('' for none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.archs, a.budgets, a.calib_images, a.val_images = "mobilenet_v2", "50%", 64, 128
        a.latency_size, a.latency_seconds, a.latency_rounds = 64, 0.2, 2
        a.finetune_images, a.round_to = 64, "16"
    return a


def cpu_info() -> dict:
    name, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    vnni = sorted(f for f in flags if "vnni" in f)
    return {"cpu": name, "vnni": vnni or None}


def ort_top1(path: Path, loader) -> float:
    from gslim.export.parity import ort_cpu

    right = total = 0
    with ort_cpu(path) as r:
        for x, y in loader:
            right += int((torch.from_numpy(r.infer(x)).argmax(1) == y).sum())
            total += int(y.numel())
    return 100.0 * right / max(total, 1)


def finetune(model, widths, base, spec, recipe, a, arch):
    """compare.py's fine-tune: the recipe's finetune section, distilled from a copy of the base."""
    import copy

    from gslim.models import ModelSpec
    from gslim.train import fit

    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    ft = recipe.finetune.model_copy(update={"device": "cpu", "max_steps_per_epoch": 2 if a.quick else None})
    data = recipe.data.model_copy(update={"train_images": a.finetune_images})
    with tempfile.TemporaryDirectory() as tmp:
        fit(
            model,
            ModelSpec(arch, spec.num_classes, spec.input_size, widths=widths or None),
            ft,
            data,
            Path(tmp),
            seed=recipe.seed,
            teacher=copy.deepcopy(base),
            force=True,
            output_name="finetuned.pt",
            progress=False,
            quiet=True,
        )
    return model.eval()


def main(argv: Optional[list[str]] = None) -> int:
    from gslim.compress.select import compress_model
    from gslim.data import calibration_batch
    from gslim.export.int8 import quantize_int8
    from gslim.export.onnx import export_onnx
    from gslim.models import count_macs_params
    from gslim.profiling.measure import summarize

    a = parse_args(argv)
    torch.set_num_threads(max(1, a.threads * 2))
    cargs = compare.parse_args(
        [
            "--recipe",
            str(a.recipe),
            "--calib-images",
            str(a.calib_images),
            "--val-images",
            str(a.val_images or 10_000_000),
            "--out",
            str(a.out),
        ]
        + (["--quick"] if a.quick else [])
        + (["--base-epochs", str(a.base_epochs)] if a.base_epochs else [])
    )
    ctx = compare.Context(cargs)
    machine = cpu_info()
    report: dict[str, Any] = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(a) | {"recipe": str(a.recipe), "out": str(a.out)},
        "archs": {},
    }
    lines = [
        f"CPU: {machine['cpu']}; VNNI: {', '.join(machine['vnni']) if machine['vnni'] else 'no'}; "
        f"ORT CPU, {a.threads} thread(s), batch 1, latency at {a.latency_size}x{a.latency_size}, "
        f"INT8 {a.calibration} calibration on {a.calib_images} images",
        "",
    ]
    for arch in a.archs.split(","):
        recipe = ctx.recipe_for(arch)
        base, spec, meta = compare.ensure_base(ctx, arch, recipe)
        size = spec.input_size
        calib_x, calib_y = calibration_batch(recipe.data, size, spec.num_classes, seed=recipe.seed)
        models = {"base": base}
        budgets = a.budgets.split(",")
        variants = [(b, 8) for b in budgets] + [(budgets[0], int(r)) for r in a.round_to.split(",") if r]
        for b, r in variants:
            cfg = recipe.compress.model_copy(
                update={
                    "criterion": "greedy",
                    "target_macs": compare.budget_fraction(b),
                    "eps": None,
                    "round_to": r,
                    "min_width": max(8, r),
                }
            )
            name = f"greedy {b}" + ("" if r == 8 else f" round_to {r}")
            compare.log(f"[{arch}] {name}")
            res = compress_model(base, size, calib_x, calib_y, cfg, seed=recipe.seed)
            models[name] = res.model
            if r == 8 and a.finetune_images:
                models[f"{name} + fine-tune"] = finetune(res.model, res.widths, base, spec, recipe, a, arch)
        base_macs = count_macs_params(base, size)[0]
        loader = compare.val_loader(recipe)
        rows: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            big_calib = F.interpolate(calib_x[:32], size=a.latency_size, mode="bilinear", align_corners=False)
            for name, m in models.items():
                stem = Path(tmp) / name.replace(" ", "_").replace("%", "")
                fp32, int8 = stem.with_suffix(".onnx"), stem.with_suffix(".int8.onnx")
                export_onnx(m, size, fp32, opset=None, dynamic_batch=True, batch=1)
                quantize_int8(fp32, int8, calib_x, method=a.calibration)
                compare.log(f"[{arch}] scoring {name} FP32 and INT8 on {len(loader.dataset)} images")
                rows[name] = {
                    "macs_fraction": count_macs_params(m, size)[0] / base_macs,
                    "fp32_top1": ort_top1(fp32, loader),
                    "int8_top1": ort_top1(int8, loader),
                }
                # latency files at the latency resolution: the same weights, a bigger input
                lf, li = stem.with_suffix(".lat.onnx"), stem.with_suffix(".lat.int8.onnx")
                export_onnx(m, a.latency_size, lf, opset=None, dynamic_batch=True, batch=1)
                quantize_int8(lf, li, big_calib, method=a.calibration)
                files[(name, "fp32")], files[(name, "int8")] = lf, li
            compare.log(f"[{arch}] timing {len(files)} files interleaved")
            samples, _, _ = compare.ort_cpu_interleaved(
                files, a.latency_size, a.threads, a.latency_seconds, a.latency_rounds
            )
        base_ms = summarize(samples[("base", "fp32")].primary, batch=1)["median_ms"]
        for name in models:
            f32 = summarize(samples[(name, "fp32")].primary, batch=1)["median_ms"]
            i8 = summarize(samples[(name, "int8")].primary, batch=1)["median_ms"]
            rows[name].update(
                {
                    "fp32_ms": f32,
                    "int8_ms": i8,
                    "int8_speedup": f32 / i8,
                    "int8_speedup_vs_base_fp32": base_ms / i8,
                }
            )
        report["archs"][arch] = {"base": meta, "rows": rows}
        lines += [
            f"### {arch} (base: {meta.get('train', meta.get('source'))})",
            "",
            "| model | MACs | FP32 top-1 | INT8 top-1 | INT8 - base FP32 | FP32 ms | INT8 ms | INT8 speedup "
            "| vs base FP32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        ref = rows["base"]["fp32_top1"]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {100 * r['macs_fraction']:.1f}% | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} "
                f"| {r['int8_top1'] - ref:+.2f} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} "
                f"| {r['int8_speedup']:.2f}x | {r['int8_speedup_vs_base_fp32']:.2f}x |"
            )
        lines.append("")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / ("int8_quick.json" if a.quick else "int8.json")
    compare.atomic_json(out, report)
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
