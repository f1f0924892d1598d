"""Reliability: every user mistake and hostile environment ends the same way.

The contract (DESIGN.md, "Conventions"): one line on stderr naming the problem (and the fix
where useful), a non-zero exit, no traceback (``--debug`` shows one), and nothing lost or
half-written. The tests drive the real CLI: in-process through ``gslim.cli.main`` (the
``run_cli`` fixture) and as a subprocess where a real process matters (signals).

Covered elsewhere and not repeated here:

* TensorRT missing for ``gslim export --engine``:
  tests/test_export.py::test_cli_engine_without_tensorrt_says_what_to_install (subprocess, exit 3)
  and ::test_engine_request_without_tensorrt_fails_before_export (nothing exported first).
* an op the target opset cannot express (``torch.triu`` at opset 13):
  tests/test_export.py::test_unexpressible_op_fails_as_one_gslim_error.
* parity failure at the stage level (only parity.json is kept):
  tests/test_export.py::test_export_stage_failed_parity_keeps_no_artifact.
* an in-process interrupt + ``resume`` ends with bit-identical weights:
  tests/test_train.py::test_resume_reaches_the_same_weights (here: a real SIGKILL).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from gslim.models import ModelSpec, build_model, load_model, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
ARCH = "mobilenet_v3_small"  # the fastest of the six at 32x32
INTERRUPTED = "gslim: interrupted (finished artifacts are intact; rerun to resume)"


# --------------------------------------------------------------------------- helpers


def one_line_error(r, code: int, *needles: str) -> str:
    """Assert the contract on a CliResult and return the line."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("gslim: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert r.code == code, f"exit {r.code}, expected {code}: {line}"
    return line


def files_under(root: Path) -> list[str]:
    """Every file (and directory) under ``root``, relative; [] when root does not exist."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def leftovers(root: Path) -> list[str]:
    """Temporary files or staging directories of an atomic write (.NAME.XXXX.tmp)."""
    return [p for p in files_under(root) if Path(p).name.endswith(".tmp")]


def calibrated(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """Random weights with BatchNorm statistics measured on data: logits of a realistic size
    (fresh torchvision models give ~1e-10 logits that make every parity check pass)."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


class _Custom:  # a class instance in a checkpoint needs code to unpickle
    def __init__(self) -> None:
        self.note = "not a tensor"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    good = calibrated(ARCH, 4)
    out = {"good": save_checkpoint(good, ModelSpec(ARCH, 4, 32), d / "good.pt")}
    raw = out["good"].read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])  # a copy cut in half
    (d / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (d / "text.pt").write_text("these are not the weights you are looking for\n" * 4)
    other = build_model("shufflenet_v2_x0_5", 4)
    save_checkpoint(other, ModelSpec("shufflenet_v2_x0_5", 4, 32), d / "other_arch.pt")
    torch.save(other.state_dict(), d / "bare_other_arch.pt")
    save_checkpoint(build_model(ARCH, 7), ModelSpec(ARCH, 7, 32), d / "other_classes.pt")
    torch.save(good, d / "module.pt")  # a pickled nn.Module
    torch.save({"state_dict": good.state_dict(), "extra": _Custom()}, d / "custom.pt")
    for name in (
        "truncated",
        "random",
        "text",
        "other_arch",
        "bare_other_arch",
        "other_classes",
        "module",
        "custom",
    ):
        out[name] = d / f"{name}.pt"
    out["missing"] = d / "missing.pt"
    return out


@pytest.fixture
def recipe(make_recipe) -> Path:
    return make_recipe({"model.arch": ARCH})


@pytest.fixture
def one_thread():
    """Training in this process with one thread, like the subprocesses (bit-identical results)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_CASES = {
    "missing": ["checkpoint not found", "missing.pt"],
    "truncated": ["truncated.pt is truncated or corrupt", "failed finding central directory"],
    "random": ["random.pt is truncated or corrupt"],
    "text": ["text.pt is truncated or corrupt"],
    "other_arch": ["holds a shufflenet_v2_x0_5 but the recipe asks for mobilenet_v3_small"],
    "bare_other_arch": ["does not fit the model", "another architecture"],
    "other_classes": ["has 7 classes but the recipe asks for 4", "model.num_classes"],
    "module": [
        "refusing to load",
        "needs to unpickle code (torchvision.models.mobilenetv3.MobileNetV3)",
        "weights_only=True",
    ],
    "custom": ["refusing to load", "_Custom)", "weights_only=True"],
}

CHECKPOINT_COMMANDS: dict[str, Callable[[Path, Path, Path], list[Any]]] = {
    "evaluate": lambda ck, rec, out: ["evaluate", ck, rec, "--json", out / "eval.json", "--no-progress"],
    "export": lambda ck, rec, out: ["export", ck, "--recipe", rec, "--out-dir", out, "--quiet"],
    "compress": lambda ck, rec, out: [
        "compress",
        rec,
        "--model",
        ck,
        "--run-dir",
        out,
        "--no-progress",
        "--target-macs",
        "60%",
    ],
}


@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_bad_checkpoint(kind, command, ckpts, recipe, run_cli, tmp_path):
    out = tmp_path / "out"
    before = files_under(ckpts["good"].parent)
    r = run_cli(CHECKPOINT_COMMANDS[command](ckpts[kind], recipe, out))
    one_line_error(r, 2, *CHECKPOINT_CASES[kind])
    assert [f for f in files_under(out)] == [], "a failed load must not write anything"
    assert files_under(ckpts["good"].parent) == before  # and leave the inputs alone


def test_debug_lets_the_exception_through(ckpts, recipe, run_cli):
    """--debug: the same error, raised with its traceback (and chained cause) instead of one line."""
    from gslim.errors import GslimError

    with pytest.raises(GslimError, match="is truncated or corrupt") as err:
        run_cli(["--debug", "evaluate", ckpts["truncated"], recipe])
    assert err.value.__cause__ is not None


# --------------------------------------------------------------------------- recipes


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


# id -> (recipe overrides | raw file content | None for the tiny recipe, extra argv, needles)
RECIPE_CASES: dict[str, tuple[Any, list[str], list[str]]] = {
    "unknown key": ({"train.epohcs": 2}, ["train"], ["train.epohcs: unknown key"]),
    "wrong type": ({"train.epochs": "three"}, ["train"], ["train.epochs: Input should be a valid integer"]),
    "section not a mapping": ("model: 5\n", ["train"], ["model: Input should be a valid dictionary"]),
    "eps zero": ({"compress.eps": 0}, ["compress"], ["compress.eps: Input should be greater than 0"]),
    "eps negative on the CLI": (
        None,
        ["compress", "--eps", "-0.5"],
        ["compress.eps: Input should be greater than 0"],
    ),
    "target above 100%": (
        {"compress.target_macs": "150%"},
        ["compress"],
        ["compress.target_macs: a fraction must be at most 100%"],
    ),
    "target not a number": (
        None,
        ["compress", "--target-macs", "half"],
        ["compress.target_macs: expected a percentage like '50%' or a count, got 'half'"],
    ),
    "two budgets": (
        {"compress.eps": 0.1, "compress.target_macs": "50%"},
        ["compress"],
        ["compress: give one of eps, target_macs, target_params, target_latency (got eps, target_macs)"],
    ),
    "negative epochs": (
        None,
        ["train", "--epochs", "-1"],
        ["train.epochs: Input should be greater than or equal to 0"],
    ),
    "batch size 0": (
        None,
        ["train", "--batch-size", "0"],
        ["data.batch_size: Input should be greater than or equal to 1"],
    ),
    "unknown architecture": ({"model.arch": "resnet1000"}, ["train"], ["unknown architecture 'resnet1000'"]),
    "not YAML": ("model: {arch: [resnet18\ntrain: 3\n", ["train"], ["is not valid YAML at line 2"]),
    "binary file": (bytes(range(256)) * 4, ["train"], ["is not a text file"]),
    "a YAML list": (
        "- model\n- train\n",
        ["train"],
        ["a recipe must be a YAML mapping of sections, got list"],
    ),
    "a YAML string": ("just words\n", ["train"], ["a recipe must be a YAML mapping of sections, got str"]),
    "--set without =": (None, ["train", "--set", "train.epochs"], ["--set expects KEY=VALUE"]),
    "--set through a value": (
        None,
        ["train", "--set", "seed.x=1"],
        ["cannot set seed.x: seed is not a section"],
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe(case, make_recipe, run_cli, tmp_path):
    content, argv, needles = RECIPE_CASES[case]
    if isinstance(content, (str, bytes)):
        path = _write(tmp_path, "bad.yaml", content)
    else:
        path = make_recipe({"model.arch": ARCH, **(content or {})})
    command, *options = argv
    r = run_cli([command, path, *options, "--run-dir", tmp_path / "run", "--no-progress"])
    one_line_error(r, 2, *needles)
    assert not (tmp_path / "run").exists(), "a bad recipe must be refused before anything is written"


def test_missing_recipe(run_cli, tmp_path):
    r = run_cli(["train", tmp_path / "nope.yaml", "--run-dir", tmp_path / "run"])
    one_line_error(r, 2, f"recipe not found: {tmp_path / 'nope.yaml'}")


def test_unreachable_macs_target(ckpts, recipe, run_cli, tmp_path):
    """1% of the MACs cannot be met when no unit may go below 64 channels: say so, write nothing."""
    run = tmp_path / "run"
    r = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ckpts["good"],
            "--target-macs",
            "1%",
            "--min-width",
            "64",
            "--criterion",
            "l1",
            "--run-dir",
            run,
            "--no-progress",
        ]
    )
    one_line_error(r, 2, "target macs", "(1.0% of the model) is unreachable", "lower compress.min_width")
    assert files_under(run) == []


# --------------------------------------------------------------------------- data


def _idx(dims: tuple[int, ...], body: bytes) -> bytes:
    return b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + body


def _fashion_dir(root: Path, case: str) -> Path:
    """A Fashion-MNIST directory whose validation files are broken in one way."""
    root.mkdir()
    images = gzip.compress(_idx((10000, 28, 28), bytes(10000 * 784)))  # all-black but well-formed
    labels = _idx((10000,), bytes(random.Random(0).randrange(10) for _ in range(10000)))
    if case == "truncated images":
        (root / "t10k-images-idx3-ubyte").write_bytes(_idx((10000, 28, 28), bytes(100 * 784)))
        (root / "t10k-labels-idx1-ubyte").write_bytes(labels)
    elif case == "wrong size":
        (root / "t10k-images-idx3-ubyte").write_bytes(_idx((100, 28, 28), bytes(100 * 784)))
        (root / "t10k-labels-idx1-ubyte").write_bytes(labels)
    elif case == "labels missing":
        (root / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    elif case == "gzip cut short":
        (root / "t10k-images-idx3-ubyte.gz").write_bytes(images)
        gz = gzip.compress(labels)
        (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    return root


def _image_folder(root: Path, case: str) -> Path:
    from PIL import Image

    g = random.Random(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (g.randrange(256), g.randrange(256), g.randrange(256))).save(
                    d / f"{i}.png"
                )
    if case == "empty class folder":
        (root / "val" / "empty").mkdir()
    elif case == "unreadable image":
        (root / "val" / "dog" / "bad.jpg").write_bytes(random.Random(1).randbytes(600))
    return root


# id -> (--set values given the data root, needles)
DATA_CASES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "imagefolder: missing directory": (
        lambda t: ["data.kind=imagefolder", f"data.root={t / 'nowhere'}"],
        ["ImageFolder split directory not found", "nowhere/val"],
    ),
    "imagefolder: empty class folder": (
        lambda t: ["data.kind=imagefolder", f"data.root={_image_folder(t / 'if', 'empty class folder')}"],
        ["Found no valid file for the classes empty"],
    ),
    "imagefolder: unreadable image": (
        lambda t: [
            "data.kind=imagefolder",
            f"data.root={_image_folder(t / 'if', 'unreadable image')}",
            "data.workers=0",
        ],
        ["unreadable image", "bad.jpg: not a valid image file (remove or replace it)"],
    ),
    "imagefolder: unreadable image, loader workers": (  # re-raised from a worker process
        lambda t: [
            "data.kind=imagefolder",
            f"data.root={_image_folder(t / 'if', 'unreadable image')}",
            "data.workers=2",
        ],
        ["unreadable image", "bad.jpg: not a valid image file (remove or replace it)"],
    ),
    "fashion-mnist: missing directory": (
        lambda t: ["data.kind=fashion-mnist", f"data.root={t / 'nowhere'}"],
        ["Fashion-MNIST directory not found", "sudo apt-get install dataset-fashion-mnist"],
    ),
    "fashion-mnist: truncated idx file": (
        lambda t: ["data.kind=fashion-mnist", f"data.root={_fashion_dir(t / 'fm', 'truncated images')}"],
        ["t10k-images-idx3-ubyte has 78400 data bytes, expected 7840000 (truncated or wrong size)"],
    ),
    "fashion-mnist: idx file of the wrong size": (
        lambda t: ["data.kind=fashion-mnist", f"data.root={_fashion_dir(t / 'fm', 'wrong size')}"],
        ["t10k-images-idx3-ubyte holds 100 items, expected 10000"],
    ),
    "fashion-mnist: labels missing": (
        lambda t: ["data.kind=fashion-mnist", f"data.root={_fashion_dir(t / 'fm', 'labels missing')}"],
        ["Fashion-MNIST file t10k-labels-idx1-ubyte(.gz) not found", "apt-get install"],
    ),
    "fashion-mnist: gzip cut short": (
        lambda t: ["data.kind=fashion-mnist", f"data.root={_fashion_dir(t / 'fm', 'gzip cut short')}"],
        ["cannot read", "t10k-labels-idx1-ubyte.gz", "Compressed file ended before the end-of-stream marker"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_validation_data(case, ckpts, recipe, run_cli, tmp_path):
    """gslim evaluate scores the validation split: every data problem is one line, no result file."""
    sets, needles = DATA_CASES[case]
    argv = ["evaluate", ckpts["good"], recipe, "--json", tmp_path / "eval.json", "--no-progress"]
    for s in sets(tmp_path):
        argv += ["--set", s]
    r = run_cli(argv)
    one_line_error(r, 2, *needles)
    assert not (tmp_path / "eval.json").exists()


def test_a_readable_image_folder_evaluates(ckpts, recipe, run_cli, tmp_path):
    """The control for the cases above: the same folder without the bad file scores fine."""
    root = _image_folder(tmp_path / "if", "ok")
    r = run_cli(
        [
            "evaluate",
            ckpts["good"],
            recipe,
            "--set",
            "data.kind=imagefolder",
            "--set",
            f"data.root={root}",
            "--no-progress",
        ]
    )
    assert r.code == 0, r.stderr
    assert "6 images" in r.stdout


def test_calibration_count_larger_than_the_dataset(ckpts, recipe, run_cli, tmp_path):
    run = tmp_path / "run"
    r = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ckpts["good"],
            "--calib-images",
            "1000",
            "--target-macs",
            "60%",
            "--run-dir",
            run,
            "--no-progress",
        ]
    )
    one_line_error(r, 2, "data.calib_images=1000 is larger than the training set (64 images)")
    assert files_under(run) == []


# --------------------------------------------------------------------------- outputs

# command -> argv given (checkpoint, recipe, an output directory that cannot be written)
OUTPUT_COMMANDS: dict[str, Callable[[Path, Path, Path], list[Any]]] = {
    "train": lambda ck, rec, out: ["train", rec, "--run-dir", out / "run", "--epochs", "0", "--no-progress"],
    "evaluate": lambda ck, rec, out: ["evaluate", ck, rec, "--json", out / "eval.json", "--no-progress"],
    "export": lambda ck, rec, out: [
        "export",
        ck,
        "--recipe",
        rec,
        "--out-dir",
        out / "onnx",
        "--opset",
        "17",
        "--quiet",
    ],
    "compress": lambda ck, rec, out: [
        "compress",
        rec,
        "--model",
        ck,
        "--run-dir",
        out,
        "--criterion",
        "l1",
        "--target-macs",
        "60%",
        "--no-progress",
    ],
}


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_output_path_under_a_regular_file(command, ckpts, recipe, run_cli, tmp_path):
    """An output directory that cannot exist because a *file* is in the way (works as root too)."""
    blocker = tmp_path / "somefile"
    blocker.write_text("I am a file\n")
    r = run_cli(OUTPUT_COMMANDS[command](ckpts["good"], recipe, blocker / "sub"))
    line = one_line_error(r, 2, str(blocker))
    assert "not a directory" in line.lower()
    assert blocker.read_text() == "I am a file\n"


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_read_only_output_directory(command, ckpts, recipe, run_cli, tmp_path, monkeypatch):
    """chmod 0o500. Root ignores permission bits, so there the denial is simulated at os.access,
    the check every writer makes first (what a non-root user sees for real)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:
        real_access = os.access

        def access(path, mode, *a, **k):
            p = Path(path)
            if mode & os.W_OK and (p == ro or ro in p.parents):
                return False
            return real_access(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)
    try:
        if command == "train":  # the run directory itself is the read-only one
            argv = ["train", recipe, "--run-dir", ro, "--epochs", "0", "--no-progress"]
        else:
            argv = OUTPUT_COMMANDS[command](ckpts["good"], recipe, ro)
        r = run_cli(argv)
        one_line_error(r, 2, "not writable", str(ro))
        assert files_under(ro) == []
    finally:
        ro.chmod(0o700)


# command -> (argv given checkpoint/recipe/dir, the finished file that must survive, words of the refusal)
FINISHED: dict[str, tuple[Callable[[Path, Path, Path], list[Any]], str, str]] = {
    "train": (
        lambda ck, rec, d: ["train", rec, "--run-dir", d, "--no-progress"],
        "base.pt",
        "already holds a finished trained model; pass --force to overwrite it",
    ),
    "compress": (
        lambda ck, rec, d: [
            "compress",
            rec,
            "--model",
            ck,
            "--run-dir",
            d,
            "--no-progress",
            "--target-macs",
            "60%",
        ],
        "slim.pt",
        "already holds a finished compressed model; pass --force to overwrite it",
    ),
    "export": (
        lambda ck, rec, d: ["export", ck, "--out-dir", d, "--quiet"],
        "model.onnx",
        "already holds a finished ONNX export; pass --force to overwrite it",
    ),
    "profile": (
        lambda ck, rec, d: ["profile", ck, "--out-dir", d, "--quiet"],
        "report.json",
        "already holds a finished profile report; pass --force to overwrite it",
    ),
}


@pytest.mark.parametrize("command", list(FINISHED))
def test_finished_results_are_not_overwritten_without_force(command, ckpts, recipe, run_cli, tmp_path):
    argv, name, words = FINISHED[command]
    d = tmp_path / "run"
    d.mkdir()
    (d / name).write_bytes(b"finished result, do not touch")
    r = run_cli(argv(ckpts["good"], recipe, d))
    one_line_error(r, 2, str(d / name), words)
    assert (d / name).read_bytes() == b"finished result, do not touch"
    assert files_under(d) == [name]


def _failing_torch_save(monkeypatch, exc: BaseException) -> None:
    """torch.save writes half of the checkpoint and then fails with ``exc`` (disk full, Ctrl-C)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise exc

    monkeypatch.setattr(torch, "save", save)


DISK_FULL = {
    "OSError ENOSPC": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)),
    # what torch's C++ writer really raises on a full disk (checked on a 1 MiB tmpfs)
    "torch writer RuntimeError": (
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
        "torch.save could not finish writing (is the disk full?)",
    ),
}


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full_keeps_the_previous_checkpoint(case, ckpts, recipe, run_cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    previous = ckpts["good"].read_bytes()
    (run / "base.pt").write_bytes(previous)
    exc, words = DISK_FULL[case]
    _failing_torch_save(monkeypatch, exc)
    r = run_cli(["train", recipe, "--run-dir", run, "--epochs", "0", "--force", "--no-progress"])
    one_line_error(r, 2, f"could not write {run / 'base.pt'}", words, "(previous file left intact)")
    assert (run / "base.pt").read_bytes() == previous
    assert leftovers(run) == []


def test_disk_full_keeps_the_previous_json(ckpts, recipe, run_cli, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text('{"top1": 12.5}\n')

    def fsync(fd):  # the data is in the page cache; the file system runs out of blocks on flush
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    r = run_cli(["evaluate", ckpts["good"], recipe, "--json", out, "--no-progress"])
    one_line_error(r, 2, f"could not write {out}", "No space left on device", "(previous file left intact)")
    assert out.read_text() == '{"top1": 12.5}\n'
    assert leftovers(tmp_path) == []


def test_disk_full_keeps_selection_and_model_consistent(ckpts, recipe, run_cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ckpts["good"],
            "--run-dir",
            run,
            "--criterion",
            "l1",
            "--target-macs",
            "70%",
            "--no-progress",
        ]
    )
    assert first.code == 0, first.stderr
    before = {n: (run / n).read_bytes() for n in ("slim.pt", "selection.json")}
    _failing_torch_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    r = run_cli(
        [
            "compress",
            recipe,
            "--model",
            ckpts["good"],
            "--run-dir",
            run,
            "--criterion",
            "l1",
            "--target-macs",
            "40%",
            "--no-progress",
            "--force",
        ]
    )
    one_line_error(r, 2, "No space left on device")
    assert (run / "slim.pt").read_bytes() == before["slim.pt"]
    assert leftovers(run) == []
    assert (run / "selection.json").read_bytes() == before["selection.json"]


# --------------------------------------------------------------------------- interruption


def _spawn(args: list[Any], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GSLIM_DEBUG"):
        env.pop(var, None)
    # A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: give the child the default
    # disposition, as a terminal's foreground process has.
    return subprocess.Popen(
        [sys.executable, "-m", "gslim", *map(str, args)],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"gslim exited ({proc.returncode}) before {path.name} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return model.state_dict()


def test_sigkill_then_resume_finishes_with_the_uninterrupted_weights(
    make_recipe, run_cli, tmp_path, one_thread
):
    """A real ``kill -9`` in epoch 2 of 4; ``--resume`` finishes, bit-identical to a run never killed."""
    recipe = make_recipe({"model.arch": ARCH, "train.epochs": 4, "data.synthetic_train": 96})
    run = tmp_path / "run"
    proc = _spawn(["train", recipe, "--no-progress"], tmp_path)
    _wait_for(run / "last.pt", proc)  # epoch 1 is saved; epoch 2 is running
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "base.pt").exists(), "the run finished before it could be killed; make it longer"
    torch.load(run / "last.pt", weights_only=True)  # the last finished state is whole (atomic rename)

    refused = run_cli(["train", recipe, "--no-progress"])
    one_line_error(
        refused, 2, "holds an unfinished run; pass --resume to continue it or --force to start over"
    )

    resumed = run_cli(["train", recipe, "--resume", "--no-progress"])
    assert resumed.code == 0, resumed.stderr
    assert "resuming train" in resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]

    straight = run_cli(["train", recipe, "--run-dir", tmp_path / "straight", "--no-progress"])
    assert straight.code == 0, straight.stderr
    a, b = _weights(tmp_path / "straight" / "base.pt"), _weights(run / "base.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the resumed and the uninterrupted run"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_is_one_line_and_leaves_no_partial_artifact(sig, code, make_recipe, tmp_path):
    """Ctrl-C (and ``docker stop``'s SIGTERM) mid-run: the interrupted line, 130/143, no model file."""
    recipe = make_recipe({"model.arch": ARCH, "train.epochs": 50})
    run = tmp_path / "run"
    proc = _spawn(["train", recipe, "--no-progress"], tmp_path)
    _wait_for(run / "last.pt", proc)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    assert not (run / "base.pt").exists()
    assert leftovers(run) == []
    torch.load(run / "last.pt", weights_only=True)  # what was finished is intact: --resume can use it


def test_interrupt_in_the_middle_of_a_write(ckpts, recipe, run_cli, tmp_path, monkeypatch):
    """Ctrl-C while a checkpoint is half on disk: the temporary file goes, the old file stays."""
    run = tmp_path / "run"
    run.mkdir()
    previous = ckpts["good"].read_bytes()
    (run / "base.pt").write_bytes(previous)
    _failing_torch_save(monkeypatch, KeyboardInterrupt())
    r = run_cli(["train", recipe, "--run-dir", run, "--epochs", "0", "--force", "--no-progress"])
    assert r.code == 130
    assert r.stderr.strip().splitlines() == [INTERRUPTED]
    assert (run / "base.pt").read_bytes() == previous
    assert leftovers(run) == []


# --------------------------------------------------------------------------- runtime


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_cuda_requested_but_unavailable(command, ckpts, recipe, run_cli, tmp_path):
    run = tmp_path / "run"
    if command == "train":
        argv = ["train", recipe, "--run-dir", run, "--device", "cuda", "--no-progress"]
    else:
        argv = [
            "evaluate",
            ckpts["good"],
            recipe,
            "--device",
            "cuda",
            "--json",
            run / "e.json",
            "--no-progress",
        ]
    r = run_cli(argv)
    one_line_error(r, 3, "CUDA was requested but no CUDA device is available (use --device cpu)")
    assert files_under(run) == []


def test_parity_failure_from_the_cli(ckpts, recipe, run_cli, tmp_path):
    """An impossible tolerance: exit 2, the numbers in one line, only parity.json (the record) kept."""
    out = tmp_path / "onnx"
    r = run_cli(
        [
            "export",
            ckpts["good"],
            "--recipe",
            recipe,
            "--out-dir",
            out,
            "--opset",
            "17",
            "--tolerance",
            "1e-12",
            "--parity-images",
            "8",
            "--quiet",
        ]
    )
    one_line_error(r, 2, "ONNX parity failed for model.onnx", "exceeds", "tolerance 1e-12")
    assert files_under(out) == ["parity.json"]
    assert json.loads((out / "parity.json").read_text())["passed"] is False


# --------------------------------------------------------------------------- determinism


def test_same_recipe_and_seed_give_the_same_selection(ckpts, recipe, run_cli, tmp_path):
    runs = []
    for name in ("a", "b"):
        r = run_cli(
            [
                "compress",
                recipe,
                "--model",
                ckpts["good"],
                "--target-macs",
                "60%",
                "--run-dir",
                tmp_path / name,
                "--no-progress",
            ]
        )
        assert r.code == 0, r.stderr
        runs.append(json.loads((tmp_path / name / "selection.json").read_text()))
    a, b = runs
    assert a["criterion"] == "greedy" and a["widths"]
    assert a["units"] == b["units"]
    assert a["widths"] == b["widths"]
    wa, wb = _weights(tmp_path / "a" / "slim.pt"), _weights(tmp_path / "b" / "slim.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_killed_between_its_state_and_its_log_line_resumes_with_every_epoch_logged(
    make_recipe, run_cli, tmp_path, one_thread, monkeypatch
):
    """The epoch's state is written before its log line: a kill between the two (seen under load in
    the SIGKILL test above) must not leave the resumed run's log without that epoch."""
    import gslim.train.loop as loop

    recipe = make_recipe({"model.arch": ARCH, "train.epochs": 2, "data.synthetic_train": 64})
    real_append = loop.append_jsonl

    def killed_after_the_state(obj, path):
        raise KeyboardInterrupt  # last.pt of epoch 1 is on disk, its log line is not

    monkeypatch.setattr(loop, "append_jsonl", killed_after_the_state)
    assert run_cli(["train", recipe, "--no-progress"]).code != 0  # the CLI reports the interrupt
    run = tmp_path / "run"
    assert (run / "last.pt").is_file() and not (run / "train_log.jsonl").exists()
    monkeypatch.setattr(loop, "append_jsonl", real_append)
    resumed = run_cli(["train", recipe, "--resume", "--no-progress"])
    assert resumed.code == 0, resumed.stderr
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and lines[0]["val_top1"] is not None
