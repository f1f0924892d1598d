# gslim for NVIDIA GPUs: compress, fine-tune, export to ONNX/TensorRT and profile in one image.
#
#   docker build -t gslim .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD:/work" gslim run /work/configs/demo.yaml
#
# Base image: the NGC TensorRT container 25.11 (nvcr.io/nvidia/tensorrt:25.11-py3). Per NVIDIA's
# release notes and public references it brings TensorRT 10.14.1 (10.14.1.48) with its Python
# bindings, CUDA 13.0 (Update 2), cuDNN 9, Ubuntu 24.04 and Python 3.12, and it needs an R580 or
# newer driver on the host. Check a pulled image with:
#   docker run --rm nvcr.io/nvidia/tensorrt:25.11-py3 python3 -c "import tensorrt; print(tensorrt.__version__)"
#
# Choices:
# - PyTorch: torch 2.14.1 from the CUDA 13.0 wheel index (cu130), the same CUDA major.minor as
#   the image, so torch, TensorRT and ONNX Runtime agree on one driver and one CUDA. Changing the
#   base image means changing TORCH_INDEX_URL to the matching cuXYZ index; never a CPU or
#   other-CUDA torch.
# - TensorRT: the image's own `tensorrt` package is pinned as a pip constraint, so the gpu extra
#   ("tensorrt>=10") is satisfied by it and pip never installs a second TensorRT from PyPI.
# - ONNX Runtime: gslim needs `onnxruntime` and its gpu extra adds `onnxruntime-gpu`; both install
#   the same `onnxruntime` module, so the CPU package is removed and the GPU one reinstalled.
# - The system Python is used (the container is the isolation): PIP_BREAK_SYSTEM_PACKAGES lets
#   pip install next to the image's TensorRT despite Ubuntu's externally-managed marker.
# - gslim runs as the unprivileged user `gslim` (uid 10001); with a bind mount, pass --user so files in the
#   mounted directory belong to you. Relative paths (runs/<name>) land in /work.
# - ENTRYPOINT is gslim itself (not NVIDIA's banner script), so `docker run gslim --help` works.

ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.11-py3
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/work/.cache/torch

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PyTorch first, in its own layer: the largest download, and it changes least often.
RUN python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/gslim
# .dockerignore lets only pyproject.toml, README.md, src/ and configs/ in.
COPY . .

RUN python3 -m pip freeze | grep -iE '^tensorrt([-_][a-z0-9_]+)?==' > /tmp/image-constraints.txt || true; \
    python3 -m pip install --no-cache-dir -c /tmp/image-constraints.txt ".[gpu]" \
    && ort_version="$(python3 -m pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
    && python3 -m pip uninstall -y onnxruntime \
    && python3 -m pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu==${ort_version}" \
    && python3 -c "import gslim, onnxruntime, tensorrt, torch; print('gslim', gslim.__version__, '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| TensorRT', tensorrt.__version__, '| onnxruntime', onnxruntime.__version__)" \
    && rm -f /tmp/image-constraints.txt

RUN useradd --create-home --shell /usr/sbin/nologin --uid 10001 --user-group gslim \
    && mkdir -p /work \
    && chown 10001:10001 /work

# numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can verify it
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["gslim"]
CMD ["--help"]
