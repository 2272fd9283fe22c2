# syntax=docker/dockerfile:1
# The producer side, torch-free: `dualstream submit|bulk|events|api|status|results|dlq`. The
# base install (`pip install .`, no extras) brings no torch, numpy, Pillow or pyarrow
# (tests/test_install_producer.py), so this image stays small and has no GPU libraries.
#
# Build from the repository root:
#   docker build -f docker/producer.Dockerfile -t registry.example.com/dualstream-producer:0.1.0 .
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
# The base install only: no [worker] extra. `worker/` is copied because it is part of the
# package; its commands say in one line that they need the extra.
RUN /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
# The same fixed non-root uid as the worker image.
RUN groupadd --system --gid 10001 dualstream \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dualstream --create-home \
        --shell /usr/sbin/nologin dualstream
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/dualstream
# 8080: the HTTP API (`dualstream api`) and the MinIO webhook (`dualstream events webhook`).
EXPOSE 8080
ENTRYPOINT ["dualstream"]
CMD ["--help"]
