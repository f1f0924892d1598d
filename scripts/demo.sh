#!/usr/bin/env bash
# Set up, then run the whole pipeline on the demo recipe (MobileNetV2 on Fashion-MNIST, CPU):
# train -> greedy compression to 50% MACs -> fine-tune -> ONNX -> profile -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/gslim run configs/demo.yaml "$@"
