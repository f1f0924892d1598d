"""The GPU checks, in one run: what benchmarks/device_check.sh runs on a lent GPU machine.

    python benchmarks/device_check.py --out OUT          # on a CUDA GPU, ~5-7 min on a datacenter card
    python benchmarks/device_check.py --out OUT --dry    # every step on tiny inputs (CPU is fine): the test

Steps, each recorded (ok / failed with its one-line reason) in ``OUT/device_check.json`` and
summarised in ``OUT/device_check.md``; a failed step does not stop the others:

1. measurement context: GPU, driver, CUDA, TensorRT, clocks and power (``gslim.profiling.gpu_context``);
2. for MobileNetV2, MobileNetV3-large and ResNet-50 at 224 (random weights, BatchNorm statistics
   re-estimated on random images): greedy selection to 50% MACs *on the GPU* (timed, and divided
   by one plain forward pass over the same images on the same device); then (``profile``) the same
   selection of MobileNetV2 and ResNet-50 under cProfile, counting the host syncs by the line that
   made them (benchmarks/selection_profile.py);
3. torch-cuda latency of base vs compressed, interleaved, FP32 and FP16, batch 1 and 32, CUDA
   graphs off and on (device time from CUDA events, the median);
4. one epoch of distillation fine-tuning of the compressed MobileNetV2 with AMP and
   channels_last on CUDA (synthetic images: the GPU machine has no dataset), its speed and loss;
5. the same MobileNetV2 selection on the CPU: does the GPU choose the same channels (widths,
   kept sets) and does its slim model compute the same outputs;
6. a latency budget on torch-cuda (ResNet-50, 85% of the base, batch 32, FP16; its floor there
   was 79.9% on an H200, the residual stream unpruned): the latency table measured on the GPU,
   the closed loop, predicted vs measured, and a second run that must take the table from the
   cache (both timed).

The results file is rewritten after every step, so a run stopped at its time limit still
returns what it measured.

Dry mode uses 32 px, batch 1 and 2, a few calibration images and the CPU when there is no GPU
(the torch-cuda rows then run on torch-cpu, FP32 only, and say so; the latency budget then runs
MobileNetV2 on torch-cpu at batch 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (the sibling selection_profile.py)

ARCHS = ("mobilenet_v2", "mobilenet_v3_large", "resnet50")
PROFILED = ("mobilenet_v2", "resnet50")  # the profile step's models: a MobileNet and a ResNet


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry", action="store_true", help="tiny inputs; CPU when there is no GPU")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--budget", type=float, default=0.5, help="MACs fraction for the greedy selection")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument(
        "--steps",
        default="select,profile,latency,finetune,agreement,budget",
        help="which steps run (a rerun in a short lease can skip what it has)",
    )
    ap.add_argument(
        "--latency-budget",
        default=None,
        help="the latency budget step's target (default 85%%; dry: 90%%, a 32-px model's floor is ~75%%)",
    )
    ap.add_argument("--seconds", type=float, default=0.5, help="timed seconds per model and setting")
    a = ap.parse_args(argv)
    a.steps = set(a.steps.split(","))
    a.size = 32 if a.dry else 224
    a.batches = (1, 2) if a.dry else (1, 32)
    a.classes = 10 if a.dry else 1000
    if a.dry:
        a.calib_images, a.seconds = min(a.calib_images, 16), min(a.seconds, 0.05)
    return a


class Steps:
    """Runs named steps, recording each result or its failure; never stops at one. With ``out``,
    the results so far are written there after every step (a run cut short keeps them)."""

    def __init__(self, out: Optional[Path] = None) -> None:
        self.results: dict[str, Any] = {}
        self.out = out

    def save(self) -> None:
        if self.out is not None:
            tmp = self.out / "device_check.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=1, default=str))
            tmp.replace(self.out / "device_check.json")

    def run(self, name: str, fn: Callable[[], Any], record: Callable[[Any], Any] = lambda v: v) -> Any:
        """``fn()``'s value; ``record(value)`` is what the results keep."""
        t0 = time.perf_counter()
        print(f"[device_check] {name} ...", flush=True)
        try:
            value = fn()
            self.results[name] = {
                "status": "ok",
                "seconds": round(time.perf_counter() - t0, 2),
                "result": record(value),
            }
            return value
        except Exception as exc:  # noqa: BLE001 - a check records any failure and goes on
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            self.results[name] = {
                "status": "failed",
                "seconds": round(time.perf_counter() - t0, 2),
                "error": f"{type(exc).__name__}: {line}",
                "traceback": traceback.format_exc(limit=6),
            }
            print(f"[device_check] {name} FAILED: {line}", flush=True)
            return None
        finally:
            self.save()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def context(a: argparse.Namespace) -> dict:
    from gslim.environment import environment_info

    info = {"environment": environment_info(), "dry": a.dry, "device": str(device())}
    if torch.cuda.is_available():
        from gslim.profiling.gpu_context import gpu_context

        info["gpu"] = gpu_context(0)
    return info


def base_model(arch: str, a: argparse.Namespace) -> torch.nn.Module:
    import torchvision

    from gslim.compress.calibrate import recalibrate_bn

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=a.classes).to(device())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(max(8, a.calib_images // 2), 3, a.size, a.size, generator=gen).to(device())
    recalibrate_bn(model, list(x.split(16)))  # realistic activations for selection and timing
    return model.eval()


def calibration_images(a: argparse.Namespace) -> torch.Tensor:
    """The selection's calibration images (on the CPU), the same for the GPU and CPU selections."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(a.calib_images, 3, a.size, a.size, generator=gen)


def select(arch: str, model: torch.nn.Module, a: argparse.Namespace) -> tuple[dict, Any]:
    from gslim.compress.select import compress_model
    from gslim.models import count_macs_params
    from gslim.recipe import CompressConfig

    x = calibration_images(a).to(device())
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        for chunk in x.split(64):  # warm-up (cuDNN autotuning, allocator)
            model(chunk)
        sync()
        t0 = time.perf_counter()
        for chunk in x.split(64):
            model(chunk)
        sync()
        forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compress_model(model, a.size, x, None, CompressConfig(target_macs=a.budget), batch_size=64)
    sync()
    select_s = time.perf_counter() - t0
    on = {str(p.device) for p in res.model.parameters()}
    base_macs = count_macs_params(model.cpu(), a.size)[0]
    macs = count_macs_params(res.model.cpu(), a.size)[0]
    model.to(device())
    res.model.to(device())
    return {
        "arch": arch,
        "calib_images": a.calib_images,
        "size": a.size,
        "selection_s": round(select_s, 3),
        "forward_s": round(forward_s, 4),
        "forward_passes": round(select_s / max(forward_s, 1e-9), 2),
        "macs_fraction": round(macs / base_macs, 4),
        "selected_on": sorted(on),
        "warnings": sum(len(u.warnings) for u in res.units),
    }, res


def profile(arch: str, model: torch.nn.Module, a: argparse.Namespace) -> dict:
    """The same selection again under cProfile, counting host syncs (benchmarks/selection_profile.py);
    its tables go into device_check.md (the device tool brings back at most 8 files)."""
    from selection_profile import profile_selection

    return profile_selection(model, calibration_images(a).to(device()), a.size, a.budget)


def latency(arch: str, base_ckpt: Path, slim_ckpt: Path, a: argparse.Namespace) -> list[dict]:
    import contextlib

    from gslim.profiling.measure import MeasureSettings, measure_interleaved, speedup, summarize
    from gslim.runtime import BackendOptions, TorchCPU, TorchCUDA

    cuda = torch.cuda.is_available()
    settings = MeasureSettings(
        warmup_s=min(0.5, a.seconds),
        min_iters=10 if a.dry else 30,
        min_seconds=a.seconds,
        rounds=2 if a.dry else 3,
    )
    rows = []
    for fp16 in (False, True) if cuda else (False,):
        for graphs in (False, True) if cuda else (False,):
            for batch in a.batches:
                opts = BackendOptions(fp16=fp16, cuda_graphs=graphs, input_size=a.size)
                cls = TorchCUDA if cuda else TorchCPU
                with contextlib.ExitStack() as stack:
                    runners = {}
                    for key, path in (("base", base_ckpt), ("compressed", slim_ckpt)):
                        r = stack.enter_context(cls(path, opts))
                        r.prepare(batch)
                        runners[key] = r
                    samples = measure_interleaved(runners, settings)
                    graph_used = runners["base"].describe().get("options", {}).get("cuda_graph")
                b = summarize(samples["base"].primary, batch=batch)
                c = summarize(samples["compressed"].primary, batch=batch)
                rows.append(
                    {
                        "arch": arch,
                        "backend": cls.name,
                        "precision": "fp16" if fp16 else "fp32",
                        "cuda_graphs": graphs,
                        "cuda_graph_captured": graph_used,
                        "batch": batch,
                        "base_ms": b["median_ms"],
                        "compressed_ms": c["median_ms"],
                        "speedup": speedup(samples["base"], samples["compressed"])["speedup"],
                    }
                )
    return rows


def finetune(arch: str, base: torch.nn.Module, res: Any, a: argparse.Namespace) -> dict:
    import copy
    import json as _json

    from gslim.models import ModelSpec
    from gslim.recipe import DataConfig, FinetuneConfig
    from gslim.train import fit

    model = copy.deepcopy(res.model)
    for p in model.parameters():
        p.requires_grad_(True)
    # a fixed lr: an 'auto' lr would add its probe fine-tunes to the time (this measures speed)
    cfg = FinetuneConfig(
        epochs=1, lr=0.01, device="cuda" if torch.cuda.is_available() else "cpu", amp=True, channels_last=True
    )
    images = 64 if a.dry else 2048
    data = DataConfig(
        kind="synthetic",
        synthetic_train=images,
        synthetic_val=max(32, images // 8),
        batch_size=16 if a.dry else 128,
        workers=0,
        calib_images=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = fit(
            model,
            ModelSpec(arch, a.classes, a.size, widths=res.widths or None),
            cfg,
            data,
            Path(tmp),
            teacher=copy.deepcopy(base),
            force=True,
            output_name="finetuned.pt",
            progress=False,
            quiet=True,
        )
        seconds = time.perf_counter() - t0
        log = [_json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    loss = log[-1].get("train_loss")
    train_rate = log[-1].get("images_per_s")  # the training loop alone: no data making, no scoring
    if loss is None or loss != loss:
        raise RuntimeError(f"fine-tuning produced no finite loss: {log[-1]}")
    return {
        "arch": arch,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "train_images_per_s": None if train_rate is None else round(train_rate, 1),
        "train_loss": loss,
        "val_top1": r.metrics.get("val_top1"),
        "amp": cfg.amp,
        "device": cfg.device,
        "channels_last": cfg.channels_last,
    }


def agreement(arch: str, base: torch.nn.Module, gpu: Any, a: argparse.Namespace) -> dict:
    """The same selection on the CPU, from the same weights and images: the channels chosen and
    the slim model's outputs compared with the GPU's."""
    import copy

    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    cpu = compress_model(
        copy.deepcopy(base).cpu(),
        a.size,
        calibration_images(a),
        None,
        CompressConfig(target_macs=a.budget),
        batch_size=64,
    )
    g = {u.name: u for u in gpu.units}
    same_width = sum(g[u.name].kept == u.kept for u in cpu.units if u.name in g)
    overlap = [
        len(set(g[u.name].order) & set(u.order)) / max(1, len(set(g[u.name].order) | set(u.order)))
        for u in cpu.units
        if u.name in g
    ]
    probe = torch.randn(8, 3, a.size, a.size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_cpu = cpu.model.eval()(probe)
        y_gpu = copy.deepcopy(gpu.model).cpu().eval()(probe)
    rel = float((y_gpu - y_cpu).norm() / y_cpu.norm().clamp_min(1e-12))
    return {
        "arch": arch,
        "units": len(cpu.units),
        "same_width": same_width,
        "mean_kept_set_jaccard": round(sum(overlap) / max(1, len(overlap)), 4),
        "min_kept_set_jaccard": round(min(overlap, default=1.0), 4),
        "widths_equal": cpu.widths == gpu.widths,
        "output_rel_diff": rel,
        "cpu_selection_s": round(cpu.seconds, 2),
    }


def latency_budget(a: argparse.Namespace, cache: Path) -> dict:
    """A latency budget measured on the GPU (torch-cuda, FP16, batch 32; dry: torch-cpu), twice:
    the second run must take every layer from the table the first one measured."""
    import os
    import shutil
    from unittest import mock

    from gslim.recipe import parse_recipe

    cuda = torch.cuda.is_available()
    arch = "resnet50" if cuda else "mobilenet_v2"
    recipe = parse_recipe(
        {
            "model": {"arch": arch, "num_classes": a.classes, "input_size": a.size},
            "compress": {
                "target_latency": a.latency_budget or ("90%" if a.dry else "85%"),
                "device": "cuda" if cuda else "cpu",
                "latency": {
                    "backend": "torch-cuda" if cuda else "torch-cpu",
                    "batch": 32 if cuda else 1,
                    "precision": "fp16" if cuda else "fp32",
                },
            },
        }
    )
    model = base_model(arch, a)
    x = torch.randn(a.calib_images // 2, 3, a.size, a.size, generator=torch.Generator().manual_seed(4))
    x = x.to(device())
    # a fresh table: the first run measures it (the variable is put back afterwards)
    with mock.patch.dict(os.environ, {"GSLIM_CACHE": str(cache)}):
        runs, info = _two_latency_runs(recipe, model, x, a)
    shutil.copyfile(info["table"]["path"], a.out / "latency_table.json")  # the table, to read
    second = runs[1]["table_measured_now"]
    if second:
        raise RuntimeError(f"the second run measured {second} layer(s) again: the table was not reused")
    return {
        "arch": arch,
        "backend": recipe.compress.latency.backend,
        "budget": recipe.compress.target_latency,
        "runs": runs,
    }


def _two_latency_runs(recipe: Any, model: torch.nn.Module, x: torch.Tensor, a: argparse.Namespace):
    from gslim.compress.select import compress_model
    from gslim.compress.stage import compress_to_latency

    runs: list[dict] = []
    for _ in range(2):
        said: list[str] = []
        t0 = time.perf_counter()

        def run(latency=None, curves=None):
            return compress_model(model, a.size, x, None, recipe.compress, latency=latency, curves=curves)

        _, info = compress_to_latency(recipe, model, a.size, run, say=said.append)
        runs.append(
            {
                "seconds": round(time.perf_counter() - t0, 2),
                "table_measured_now": info["table"]["measured_now"],
                "table_entries": info["table"]["entries"],
                "rounds": len(info["rounds"]),
                "budget_ms": info["budget_ms"],
                "base_ms": info["base_ms"],
                "measured_ms": info["measured_ms"],
                "predicted_session_ms": info["predicted_session_ms"],
                "prediction_error": info["prediction_error"],
                "speedup": info["speedup"],
                "said": said,
            }
        )
    return runs, info


def markdown(results: dict) -> str:
    lines = ["# gslim device check", ""]
    ctx = (results.get("context") or {}).get("result") or {}
    gpu = ctx.get("gpu") or {}
    env = ctx.get("environment") or {}
    lines.append(
        f"- device: {gpu.get('gpu') or ctx.get('device')}; driver {gpu.get('driver')}; CUDA "
        f"{gpu.get('cuda_runtime')}; TensorRT {gpu.get('tensorrt')}; torch {env.get('torch')}; dry: {ctx.get('dry')}"
    )
    for note in gpu.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r.get('error', '')} |")
    sel = [r["result"] for n, r in results.items() if n.startswith("select ") and r["status"] == "ok"]
    if sel:
        lines += [
            "",
            "| model | selection s | forward s | forward passes | MACs | selected on |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['arch']} | {s['selection_s']} | {s['forward_s']} | {s['forward_passes']} | "
            f"{100 * s['macs_fraction']:.1f}% | {', '.join(s['selected_on'])} |"
            for s in sel
        ]
    lat = [
        row
        for n, r in results.items()
        if n.startswith("latency ") and n != "latency budget" and r["status"] == "ok"
        for row in r["result"]
    ]
    if lat:
        lines += [
            "",
            "| model | backend | precision | CUDA graphs | batch | base ms | compressed ms | speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['arch']} | {x['backend']} | {x['precision']} | {x['cuda_graph_captured']} | {x['batch']} | "
            f"{x['base_ms']:.3f} | {x['compressed_ms']:.3f} | {x['speedup']:.2f}x |"
            for x in lat
        ]
    ft = results.get("finetune mobilenet_v2", {}).get("result")
    if ft:
        lines += [
            "",
            f"Fine-tune (1 epoch, AMP, channels_last, {ft['device']}): {ft['train_images_per_s']} img/s "
            f"in the training loop ({ft['images_per_s']} img/s counting the synthetic data's making and "
            f"the scoring), loss {ft['train_loss']:.3f}",
        ]
    agree = results.get("cpu agreement mobilenet_v2", {}).get("result")
    if agree:
        lines.append(
            f"CPU vs GPU selection (MobileNetV2): {agree['same_width']}/{agree['units']} units the same "
            f"width, kept sets' Jaccard mean {agree['mean_kept_set_jaccard']} (min "
            f"{agree['min_kept_set_jaccard']}), slim outputs differ by {agree['output_rel_diff']:.2e} (relative)"
        )
    for name, r in results.items():
        if name.startswith("profile ") and r["status"] == "ok":
            from selection_profile import markdown as profile_markdown

            lines += ["", profile_markdown(r["result"], name.split(" ", 1)[1])]
    lb = results.get("latency budget", {}).get("result")
    if lb:
        lines += [
            "",
            f"Latency budget {lb['budget']} on {lb['backend']} ({lb['arch']}):",
            "",
            "| run | seconds | layers timed | rounds | base ms | budget ms | measured ms | predicted ms | error | speedup |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {i + 1} | {r['seconds']} | {r['table_measured_now']} | {r['rounds']} | {r['base_ms']:.3f} | "
            f"{r['budget_ms']:.3f} | {r['measured_ms']:.3f} | {r['predicted_session_ms']:.3f} | "
            f"{100 * r['prediction_error']:+.1f}% | {r['speedup']:.2f}x |"
            for i, r in enumerate(lb["runs"])
        ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from gslim.models import ModelSpec, save_checkpoint

    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    steps = Steps(a.out)
    steps.run("context", lambda: context(a))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [x for x in a.archs.split(",") if x]:
            base = steps.run(f"build {arch}", lambda arch=arch: base_model(arch, a))
            if base is None:
                continue
            out = steps.run(
                f"select {arch}", lambda arch=arch, base=base: select(arch, base, a), record=lambda v: v[0]
            )
            if out is None:
                continue
            _, res = out
            base_ckpt = save_checkpoint(base, ModelSpec(arch, a.classes, a.size), Path(tmp) / f"{arch}.pt")
            slim_ckpt = save_checkpoint(
                res.model,
                ModelSpec(arch, a.classes, a.size, widths=res.widths),
                Path(tmp) / f"{arch}.slim.pt",
            )
            if "profile" in a.steps and arch in PROFILED:
                steps.run(f"profile {arch}", lambda arch=arch, base=base: profile(arch, base, a))
            if "latency" in a.steps:
                steps.run(
                    f"latency {arch}", lambda arch=arch, b=base_ckpt, s=slim_ckpt: latency(arch, b, s, a)
                )
            if arch == "mobilenet_v2" and "finetune" in a.steps:
                steps.run(
                    f"finetune {arch}", lambda arch=arch, base=base, res=res: finetune(arch, base, res, a)
                )
            if arch == "mobilenet_v2" and "agreement" in a.steps:
                steps.run(
                    f"cpu agreement {arch}",
                    lambda arch=arch, base=base, res=res: agreement(arch, base, res, a),
                )
            del base, res
        if "budget" in a.steps:
            steps.run("latency budget", lambda: latency_budget(a, Path(tmp) / "cache"))
    steps.save()
    (a.out / "device_check.md").write_text(markdown(steps.results))
    print(markdown(steps.results))
    failed = [n for n, r in steps.results.items() if r["status"] != "ok"]
    print(
        f"[device_check] {len(steps.results) - len(failed)} ok, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
