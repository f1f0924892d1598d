#!/usr/bin/env bash
# The GPU checks of gslim in one run, for a lent GPU machine (see benchmarks/device_check.py).
#
#   OUT=/path/to/results bash benchmarks/device_check.sh          # on the GPU machine (< 9 min)
#   OUT=/tmp/dc bash benchmarks/device_check.sh --dry             # every step on tiny inputs, CPU is fine
#   GSLIM_DEVICE_TESTS=0 OUT=... bash benchmarks/device_check.sh --archs "" --steps budget   # a short rerun
#
# It needs only a bare GPU box's Python: torch with CUDA, torchvision, onnx, onnxruntime and
# typer. gslim's other small dependencies travel as wheels in .whl/ (fetch them on the
# developer machine first: `bash benchmarks/fetch_device_wheels.sh`, then name .whl in the
# device call's carry) and install into /tmp/site; gslim itself installs with --no-deps.
# Results (device_check.json, device_check.md, nvidia-smi.txt, the log) go under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/device_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
# the carried wheels, only where gslim's dependencies are missing (a bare GPU box)
if ! "$PY" -c "import fvcore, pydantic" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import gslim" 2> /dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
if [ "${1:-}" != "--dry" ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi is not available" > "$OUT/nvidia-smi.txt"
fi
# at most 360 s of checks, then 2 x 60 s of tests: under 9 minutes in a 10-minute call
status=0
PYTHONUNBUFFERED=1 timeout 360 "$PY" benchmarks/device_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log" || status=$?
if [ "${1:-}" != "--dry" ] && [ "${GSLIM_DEVICE_TESTS:-1}" != 0 ]; then
  # the tests that need CUDA (marked gpu; they skip on CI's CPU machines), then the GPU-readiness
  # file with CUDA present; TensorRT's tests skip with their reason where it is missing
  tests=0
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rs tests -m gpu > "$OUT/pytest_gpu.txt" 2>&1 || tests=$?
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu_readiness.py -m "not slow" >> "$OUT/pytest_gpu.txt" 2>&1 || tests=$?
  tail -n 20 "$OUT/pytest_gpu.txt"
  if [ "$tests" != 0 ]; then
    echo "[device_check] the GPU tests failed (exit $tests): see pytest_gpu.txt"
    status=1
  fi
fi
exit "$status"
