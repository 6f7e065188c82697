# syntax=docker/dockerfile:1
# kodkod server image: one file, two flavours, chosen by the build argument FLAVOUR.
#   docker build -t kodkod .                                # cpu (default): python slim, CPU torch
#   docker build -t kodkod:cuda --build-arg FLAVOUR=cuda .  # cuda: kernels compiled here, CUDA runtime image
# --build-arg BAKE_MODEL=1 puts the default model into the image (/opt/kodkod), so a container
# without persistent storage serves within seconds of its start instead of fetching it first.
# Running it, and the Hugging Face Spaces deploy: docs/deploy.md.

ARG FLAVOUR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch 2.13.0 from PyPI is built for CUDA 13.0 (deploy/torch.txt): NVIDIA driver 580 or newer.
# Another CUDA: CUDA_VERSION of the same major as a torch build from TORCH_INDEX (docs/deploy.md).
ARG CUDA_VERSION=13.0.1
ARG TORCH_INDEX=

# ---- the kodkod wheel (pure Python, with csrc/ for the kernels) ----
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY server server
COPY languages languages
COPY csrc csrc
RUN pip install --no-cache-dir setuptools==84.2.1 \
 && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

# ---- cpu: CPU torch and kodkod in /opt/venv ----
FROM ${PYTHON_IMAGE} AS build-cpu
COPY constraints.txt /src/constraints.txt
COPY deploy /src/deploy
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv && sh /src/deploy/install.sh /opt/venv cpu /wheels

FROM ${PYTHON_IMAGE} AS runtime-cpu
COPY --from=build-cpu /opt/venv /opt/venv
RUN mkdir -p /opt/kodkod

# ---- cuda: CUDA torch, kodkod, and the kernels compiled for compute capability 7.5 (T4) to 9.0 (H100) ----
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
# DL3008 (apt versions unpinned): the image tag fixes the Ubuntu release; its exact package
# revisions leave the archive when security updates come, and a pinned build would then fail.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ \
 && rm -rf /var/lib/apt/lists/*
COPY constraints.txt /src/constraints.txt
COPY deploy /src/deploy
COPY --from=wheel /wheels /wheels
ARG TORCH_INDEX
RUN python3.11 -m venv /opt/venv && TORCH_INDEX="$TORCH_INDEX" sh /src/deploy/install.sh /opt/venv cuda /wheels
ENV TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0"
RUN KODKOD_HOME=/opt/kodkod /opt/venv/bin/kodkod build-kernels --arch "$TORCH_CUDA_ARCH_LIST"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda
# DL3008: as in build-cuda.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /opt/venv /opt/venv
COPY --from=build-cuda /opt/kodkod /opt/kodkod
# the same list as the build: it is part of the prebuilt kernels' cache key
ENV TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0"

# ---- the image: a non-root user (uid 1000, as Spaces run it), KODKOD_HOME=/data ----
# DL3006 (untagged image): runtime-cpu and runtime-cuda are stages of this file, not registry images.
# hadolint ignore=DL3006
FROM runtime-${FLAVOUR}
ARG FLAVOUR
ARG BAKE_MODEL=0
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    KODKOD_HOME=/data \
    KODKOD_BAKED_HOME=/opt/kodkod \
    KODKOD_HOST=0.0.0.0 \
    PORT=8080
RUN useradd --create-home --uid 1000 user \
 && mkdir -p /data \
 && chown user:user /data \
 && if [ "$BAKE_MODEL" = "1" ]; then \
      target=cpu; if [ "$FLAVOUR" = cuda ]; then target=gpu; fi; \
      KODKOD_HOME=/opt/kodkod kodkod download --for "$target" --no-progress \
      && rm -rf /opt/kodkod/models/*/model.gguf /opt/kodkod/tmp; \
    fi
USER 1000:1000
WORKDIR /home/user
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('KODKOD_PORT') or os.environ.get('PORT') or '8080'), timeout=4)"]
ENTRYPOINT ["kodkod"]
CMD ["serve"]
