"""The package structure's promises: one train stage for ``gslim train`` and ``gslim run``,
every stage callable from Python without the CLI, and no invented accuracy in ``gslim profile``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FASHION_MNIST_DIR, tiny_recipe_dict

FAST_REST = {  # everything after training as cheap as it goes
    "compress.criterion": "l1",
    "compress.target_macs": "80%",
    "finetune.epochs": 0,
    "finetune.device": "cpu",
    "profile.backends": ["torch-cpu"],
    "profile.min_iters": 2,
    "profile.min_seconds": 0.0,
    "profile.warmup_s": 0.0,
    "profile.rounds": 1,
    "profile.eval_images": 8,
    "export.opset": 17,
}


def _slim_checkpoint_and_teacher(tmp_path: Path) -> tuple[Path, Path, dict]:
    from gslim.compress.select import compress_model
    from gslim.models import ModelSpec, build_model, save_checkpoint
    from gslim.recipe import CompressConfig

    torch.manual_seed(0)
    teacher = build_model("mobilenet_v2", 4, None).eval()
    save_checkpoint(teacher, ModelSpec("mobilenet_v2", 4, 32), tmp_path / "teacher.pt")
    x = torch.randn(8, 3, 32, 32)
    res = compress_model(teacher, 32, x, None, CompressConfig(criterion="l1", target_macs=0.6))
    save_checkpoint(res.model, ModelSpec("mobilenet_v2", 4, 32, widths=res.widths), tmp_path / "slim.pt")
    return tmp_path / "slim.pt", tmp_path / "teacher.pt", res.widths


def test_run_and_train_write_the_same_train_artifacts(make_recipe, run_cli, tmp_path):
    from gslim.models import read_checkpoint

    slim, teacher, widths = _slim_checkpoint_and_teacher(tmp_path)
    recipe = make_recipe(
        {
            **FAST_REST,
            "model.weights": str(slim),
            "train.max_steps_per_epoch": 2,
            "train.distill": {"teacher": str(teacher), "alpha": 0.5},
            "sweep": None,
        }
    )
    res = run_cli(["run", recipe, "--no-progress"])
    assert res.code == 0, res.stderr
    res = run_cli(["train", recipe, "--run-dir", tmp_path / "alone", "--no-progress"])
    assert res.code == 0, res.stderr
    via_run, alone = tmp_path / "run", tmp_path / "alone"
    for name in ("base.pt", "last.pt", "train_log.jsonl", "recipe.resolved.yaml", "train_env.json"):
        assert (via_run / name).is_file() and (alone / name).is_file(), name
    spec_run, state_run = read_checkpoint(via_run / "base.pt")
    spec_alone, state_alone = read_checkpoint(alone / "base.pt")
    assert spec_run.widths == spec_alone.widths == widths  # the local checkpoint's widths are kept
    assert spec_run.meta["train"]["distilled"] and spec_alone.meta["train"]["distilled"]  # distill.teacher
    assert state_run.keys() == state_alone.keys()
    assert all(torch.equal(state_run[k], state_alone[k]) for k in state_run)  # the same training
    a = yaml.safe_load((via_run / "recipe.resolved.yaml").read_text())
    b = yaml.safe_load((alone / "recipe.resolved.yaml").read_text())
    a.pop("run_dir"), b.pop("run_dir")
    assert a == b
    assert json.loads((via_run / "train_env.json").read_text())["command"] == "run"


def test_every_stage_runs_from_python_without_the_cli(tmp_path):
    recipe = tiny_recipe_dict({**FAST_REST, "run_dir": str(tmp_path / "run"), "train.max_steps_per_epoch": 2})
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from gslim.recipe import parse_recipe
        from gslim.train.stage import train_stage
        from gslim.compress.stage import compress_stage, finetune_stage
        from gslim.export.stage import export_stage
        from gslim.profiling import ArtifactSet
        from gslim.profiling.stage import profile_stage

        r = parse_recipe({recipe!r}, "test")
        run = Path(r.run_dir)
        train_stage(r, run, progress=False)
        compress_stage(r, run, model_path=run / "base.pt", progress=False)
        finetune_stage(r, run, progress=False)
        export_stage(run / "finetuned.pt", r, run / "export", progress=False)
        profile_stage([ArtifactSet("base", "base", run / "base.pt"),
                       ArtifactSet("slim", "compressed", run / "finetuned.pt", run / "export" / "model.onnx")],
                      r, run / "report", progress=False)
        assert (run / "report" / "report.md").is_file()
        cli = sorted(m for m in sys.modules if m.startswith(("gslim.cli", "gslim.commands", "typer")))
        print("CLI MODULES", cli)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CLI MODULES []" in out.stdout


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed (apt dataset-fashion-mnist)"
)
def test_profile_without_a_recipe_does_not_invent_accuracy(run_cli, tmp_path, make_recipe):
    from gslim.models import ModelSpec, build_model, save_checkpoint

    ck = tmp_path / "m.pt"
    save_checkpoint(build_model("mobilenet_v2", 4, None).eval(), ModelSpec("mobilenet_v2", 4, 32), ck)
    fast = [
        "--backend",
        "torch-cpu",
        "--min-iters",
        "2",
        "--min-seconds",
        "0",
        "--warmup-s",
        "0",
        "--rounds",
        "1",
        "--quiet",
    ]
    res = run_cli(["profile", ck, "--out-dir", tmp_path / "a", *fast])
    assert res.code == 0, res.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["accuracy"] and all(
        a["top1"] is None and "not measured" in a["reason"] for a in report["accuracy"]
    )
    assert "not measured" in (tmp_path / "a" / "report.md").read_text()

    # data whose classes differ from the model's outputs (Fashion-MNIST has 10): one clear error, no report
    other = make_recipe({"data": {"kind": "fashion-mnist", "val_images": 16}}, name="ten.yaml")
    res = run_cli(["profile", ck, "--recipe", other, "--out-dir", tmp_path / "b", *fast])
    assert res.code == 2 and "10" in res.stderr and "classes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "b" / "report.json").exists()

    # with the model's own recipe it is measured
    own = make_recipe({"profile.eval_images": 8}, name="own.yaml")
    res = run_cli(["profile", ck, "--recipe", own, "--out-dir", tmp_path / "c", *fast])
    assert res.code == 0, res.stderr
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert all(a["top1"] is not None for a in report["accuracy"])
