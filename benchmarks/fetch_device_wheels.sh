#!/usr/bin/env bash
# Fetch, here, the wheels gslim needs on a bare GPU machine that cannot reach any registry, into
# .whl/ (git-ignored through .git/info/exclude), for benchmarks/device_check.sh to install there.
# The GPU image already has torch, torchvision, onnx, onnxruntime, typer, rich, pyyaml,
# matplotlib, tabulate and portalocker (device tool's KINDS.md); these are the rest, at the
# versions this machine's gslim environment runs (Python 3.12 wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "termcolor", "fvcore", "iopath", "yacs"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
mkdir -p .whl
for pin in $pins; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pin" 2> /dev/null \
    || "$PY" -m pip wheel -q --no-deps -w .whl "$pin"   # sdist-only releases (fvcore, iopath, yacs): build them
done
ls -1 .whl
