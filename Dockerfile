# syntax=docker/dockerfile:1
#
# twostage image. Stages:
#   source            the project sources and its wheel (serving install, no extras)
#   export            torch (CPU) + the packaged offline models -> optimized int8 ONNX in /models (build time only)
#   runtime-nomodels  the serving install only (no torch), non-root, models expected at /models (mount them)
#   runtime           runtime-nomodels with the exported models baked in at /models (the default target)
#
#   docker build -t twostage .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v twostage-data:/data twostage
#
#   docker build --target runtime-nomodels -t twostage:nomodels .
#   docker run --rm -p 50051:50051 -v "$PWD/models:/models:ro" -v twostage-data:/data twostage:nomodels
#
# Any server option can be given as a TWOSTAGE_<OPTION> environment variable or appended after the image
# name (that replaces CMD, so repeat --models/--index/--host). Set the gRPC port with TWOSTAGE_PORT: the
# HEALTHCHECK reads it too. The HEALTHCHECK speaks plaintext gRPC; with TLS on, override it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# ---------------------------------------------------------------------------------------------- source
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client/ client/
COPY model/ model/
COPY server/ server/
COPY export/ export/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------- export
FROM source AS export
# torch comes from the CPU-only wheel index (the default index's Linux build pulls in CUDA); keep
# TORCH_VERSION equal to the pin in pyproject's export extra (tests/test_dockerfile.py checks it).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# Quantization target: auto = the build machine's CPU. Set avx2 or generic when the image runs on other
# hardware than it is built on.
ARG EXPORT_TARGET=auto
# DL3013: the project's own dependency ranges live in pyproject.toml; torch is pinned just above.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir ".[export,models]"
RUN twostage export --out /models --offline-defaults --target "${EXPORT_TARGET}"

# ------------------------------------------------------------------------------------ runtime-nomodels
FROM base AS runtime-nomodels
# The serving install plus the Milvus client (a small pure-Python package; no torch), so one image serves either
# backend: the embedded index (--index) or a Milvus collection (--milvus-uri). The version pin (pyproject.toml's)
# makes pip take the wheel built above: an unrelated "twostage" project exists on PyPI with higher versions.
RUN --mount=type=bind,from=source,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels "twostage[milvus]==0.1.0"
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /data twostage \
 && mkdir -p /models /data/index \
 && chown -R 10001:10001 /data
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; reply = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('TWOSTAGE_PORT', '50051'))).Check(h.HealthCheckRequest(), timeout=4); sys.exit(0 if reply.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["twostage", "serve"]
CMD ["--models", "/models", "--index", "/data/index", "--host", "0.0.0.0"]

# ------------------------------------------------------------------------------------------- runtime
FROM runtime-nomodels AS runtime
COPY --from=export /models /models
