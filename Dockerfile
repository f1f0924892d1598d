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
#   ("tensorrt>=10") is satisfied by it and pip never installs a second TensorRT from PyPI (a
#   TensorRT 11 from PyPI would switch gslim to its TensorRT 11 path). The pin comes from
#   `pip list --format=freeze`, which prints NAME==VERSION also for a wheel installed from a file
#   (`pip freeze` prints `tensorrt @ file://...` there), and an empty pin fails the build.
# - ONNX Runtime: onnxruntime-gpu pinned (ORT_GPU_VERSION) to a build for this image's CUDA and
#   TensorRT majors. Checked on 2026-12-01 by reading the PyPI wheel of 1.31.1: its provider
#   libraries need libcudart.so.13, libcublas(Lt).so.13, libcudnn.so.9 and libnvinfer.so.10
#   (readelf -d), and its `cuda` extra asks for nvidia-cuda-runtime~=13.0: the CUDA 13 build, with
#   the TensorRT EP built against TensorRT 10, as this image has. (ORT 1.22-1.2x put only CUDA 12
#   builds on PyPI; changing the pin or the base image is checked by the build, below.) gslim needs
#   `onnxruntime` and the gpu extra adds `onnxruntime-gpu`; both install the same module, so the
#   CPU package is removed and the GPU one reinstalled.
# - The build fails, without needing a GPU, when the stack does not fit together: `ldd` of ORT's
#   CUDA and TensorRT provider libraries must find every library, and the TensorRT Python
#   module's version must be the version of the image's libnvinfer.
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
ARG ORT_GPU_VERSION=1.31.1

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

RUN set -eu; \
    python3 -m pip list --format=freeze | grep -iE '^tensorrt([-_][a-z0-9_]+)?==' > /tmp/image-constraints.txt \
        || { echo "the base image has no tensorrt Python package to pin" >&2; exit 1; }; \
    python3 -m pip install --no-cache-dir -c /tmp/image-constraints.txt ".[gpu]" "onnxruntime-gpu==${ORT_GPU_VERSION}"; \
    python3 -m pip uninstall -y onnxruntime; \
    python3 -m pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}"; \
    capi="$(python3 -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"; \
    for lib in libonnxruntime_providers_cuda.so libonnxruntime_providers_tensorrt.so; do \
        test -f "${capi}/${lib}" || { echo "onnxruntime-gpu has no ${lib}" >&2; exit 1; }; \
        if ldd "${capi}/${lib}" | grep 'not found'; then echo "${lib} cannot load in this image (above)" >&2; exit 1; fi; \
    done; \
    trt_py="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')"; \
    nvinfer="$(readlink -f "$(ldconfig -p | awk '/libnvinfer\.so\.[0-9]+ /{print $NF; exit}')")"; \
    trt_lib="${nvinfer##*libnvinfer.so.}"; \
    case "${trt_py}" in "${trt_lib}"*) ;; *) echo "tensorrt ${trt_py} != libnvinfer ${trt_lib}" >&2; exit 1 ;; esac; \
    python3 -c "import gslim, onnxruntime, tensorrt, torch; print('gslim', gslim.__version__, '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| TensorRT', tensorrt.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"; \
    rm -f /tmp/image-constraints.txt

RUN useradd --create-home --shell /usr/sbin/nologin --uid 10001 --user-group gslim \
    && mkdir -p /work \
    && chown 10001:10001 /work

# numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can verify it
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["gslim"]
CMD ["--help"]
