# gpulab: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make
SRC_SHIM := $(wildcard gpu_worker/shim/*.c gpu_worker/shim/*.h)

.PHONY: demo demo-cuda test test-gpu install build generate bench clean

# The embedded default: JupyterHub + GPU pool + a local worker (the GPU, or the emulated device).
demo: build
	$(PYTHON) -m gpulab.cli up

# Only the remote-CUDA path: a worker and a short CUDA program through the shim.
demo-cuda: build
	$(PYTHON) -m gpulab.cli demo

test: build
	$(PYTHON) -m pytest -q

# Needs a GPU machine: the cuda backend and unmodified programs on a real device.
test-gpu: build
	$(PYTHON) -m pytest -q -m gpu

# System packages: a C compiler for the shim, Debian's Chromium for the browser tests,
# Node.js and configurable-http-proxy for JupyterHub. Installed only when missing.
$(STAMP)/system:
	@command -v cc >/dev/null && command -v chromium >/dev/null && command -v npm >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends gcc chromium nodejs npm)
	@command -v configurable-http-proxy >/dev/null || npm install -g configurable-http-proxy
	@mkdir -p $(STAMP) && touch $@

# Python packages (the shim is compiled by the same `pip install`, with the system C compiler).
$(STAMP)/installed: pyproject.toml setup.py $(STAMP)/system
	$(PIP) install -q -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/installed

# Rebuild the shim when its sources change (pip install -e builds it the first time).
gpu_worker/shim/lib/libcuda.so.1: $(SRC_SHIM) | $(STAMP)/installed
	$(PYTHON) gpu_worker/shim/build.py

build: install gpu_worker/shim/lib/libcuda.so.1

# Regenerate the C stubs and the Python dispatch from gpu_worker/api_table.py.
generate:
	$(PYTHON) -m gpu_worker.api.codegen

bench: build
	$(PYTHON) benchmarks/remote_driver.py
	$(PYTHON) benchmarks/spawn.py

clean:
	rm -rf $(STAMP) gpu_worker/shim/lib build *.egg-info
