# syntax=docker/dockerfile:1
# The GPU worker: `dualstream worker` with the [worker] extra (torch, transformers, open_clip).
#
# Base: python slim, not nvidia/cuda. torch 2.14.1's PyPI wheel is a CUDA 13.0 build that
# carries its own CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels; only the driver comes
# from the node (mounted by the NVIDIA container toolkit). A CUDA base image would add a second,
# unused copy of those libraries (several GB), at a CUDA version that need not match torch's.
# The node's driver must support CUDA 13.0 (R580 or newer).
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t registry.example.com/dualstream-worker:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dualstream ./dualstream
COPY control ./control
COPY producer ./producer
COPY schemas ./schemas
COPY worker ./worker
# torch and torchvision as pyproject.toml's [worker] extra pins them, then the package itself
# (not editable: the runtime stage has no /src).
RUN /opt/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
    && /opt/venv/bin/pip install ".[worker]"

FROM ${PYTHON_IMAGE}
# One fixed non-root uid, the one the Kubernetes manifests name in runAsUser.
RUN groupadd --system --gid 10001 dualstream \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dualstream --create-home \
        --shell /usr/sbin/nologin dualstream \
    && mkdir -p /models/hf \
    && chown -R 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
# HF_HOME: the model cache, a volume in Kubernetes, filled before the workers start
# (docs/operations.md, "Model cache"). Offline: a worker never downloads weights at start-up;
# a model missing from the cache fails fast instead of reaching for the hub.
# NVIDIA_DRIVER_CAPABILITIES: what the container toolkit mounts (the CUDA base images set it).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/dualstream
# 9100: the worker's health endpoint (/livez, /readyz) for the Kubernetes probes.
EXPOSE 9100
ENTRYPOINT ["dualstream"]
CMD ["worker", "--loglevel", "INFO"]
