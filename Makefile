# gpulab: `make demo` and `make test` do all set-up on a fresh machine.
#
#   make demo ARGS="--port 8001"    options for `gpulab up`
#   make test PYTEST_ARGS="-k pool" options for pytest
#   make validate-gpu               on a GPU machine: `pytest -m gpu`, the benchmarks, a dated report
#                                   (PART=tests or PART=benchmarks: one of the two, to fit a 10-minute call)
#
# System pieces (C compiler, Debian's Chromium and Prometheus, Node.js, npm, configurable-http-proxy) are checked on
# every run by tools/bootstrap.py, which installs each missing one on its own. Python packages go
# into a virtual environment: the active one ($VIRTUAL_ENV), else .venv here.

# The interpreter that runs the bootstrap and creates the venv (the system's, before any venv exists).
PYTHON ?= python3
VENV ?= $(or $(VIRTUAL_ENV),$(CURDIR)/.venv)
VPY := $(VENV)/bin/python
# JupyterHub finds configurable-http-proxy on PATH; the bootstrap installs it into the venv.
export PATH := $(VENV)/bin:$(PATH)

STAMP := .make
# Every C source and header of the shim, whatever files it is split into.
SRC_SHIM := $(wildcard gpu_worker/shim/*.c gpu_worker/shim/*.h)
# One stamp per venv, so switching venvs never finds another venv's stamp.
PIP_STAMP := $(STAMP)/installed$(subst /,-,$(abspath $(VENV)))

# Where pip takes packages from. With WHEELHOUSE (a machine without network, such as the device
# machine) it installs the project without resolving dependencies, plus every wheel carried in that
# folder, and builds with the setuptools and wheel already in the venv: see docs/validation.md, "How
# to carry a GPU run to the device machine".
WHEELHOUSE ?=
ifneq ($(WHEELHOUSE),)
PIP_INSTALL ?= --no-index --no-deps --no-build-isolation -e . $(wildcard $(WHEELHOUSE)/*.whl)
else
PIP_INSTALL ?= -e '.[test]'
endif

# What the bootstrap sets up: each goal below says which pieces it needs.
NEEDS ?= test
demo: NEEDS := demo
demo-cuda test-gpu validate-gpu wheelhouse: NEEDS := gpu

ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo demo-cuda test test-gpu validate-gpu system install build labextension generate bench wheelhouse clean FORCE

# The embedded default: JupyterHub + GPU pool + a local worker (the GPU, or the emulated device).
demo: build
	$(VENV)/bin/gpulab up $(ARGS)

# Only the remote-CUDA path: a worker and a short CUDA program through the shim.
demo-cuda: build
	$(VENV)/bin/gpulab demo $(ARGS)

test: build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# Needs a GPU machine: the cuda backend and unmodified programs on a real device.
test-gpu: build
	$(VPY) -m pytest -q -m gpu $(PYTEST_ARGS)

# `pytest -m gpu` (tests/test_gpu*.py, native mode's tests/test_gpu_native.py among them) and the GPU
# benchmarks (benchmarks/remote_driver.py, tiering.py, native.py: validate_gpu.py runs each), then a dated
# report for docs/validation.md (REPORT=file also writes it there). Refuses before installing anything when
# no NVIDIA GPU is visible. build.py runs every time: the rule for lib/libcuda.so.1 does not see the native
# build's sources (gpu_worker/shim/native/), and native mode must be measured as it is now.
REPORT ?=
validate-gpu:
	@$(PYTHON) benchmarks/validate_gpu.py --preflight
	@$(MAKE) --no-print-directory build NEEDS=gpu
	$(VPY) gpu_worker/shim/build.py
	$(VPY) benchmarks/validate_gpu.py $(if $(PART),--part $(PART)) $(if $(REPORT),--output $(REPORT))

# Cheap, so it runs every time: a piece removed since the last run is installed again.
system:
	@$(PYTHON) tools/bootstrap.py --for $(NEEDS) --venv $(VENV)

$(VENV)/pyvenv.cfg: | system
	@test -f $@ || { echo "no virtual environment at $(VENV)"; exit 1; }

# Python packages (the shim is compiled by the same `pip install`, with the system C compiler).
# Re-run when the project's metadata changes, the venv is new, or its `gpulab` command is gone.
$(PIP_STAMP): pyproject.toml setup.py $(VENV)/pyvenv.cfg $(if $(wildcard $(VENV)/bin/gpulab),,FORCE) | system
	$(VPY) -m pip install -q $(PIP_INSTALL)
	@mkdir -p $(STAMP) && touch $@

install: $(PIP_STAMP)

# Rebuild the shim when its sources change (pip install -e builds it the first time).
gpu_worker/shim/lib/libcuda.so.1: $(SRC_SHIM) | $(PIP_STAMP)
	$(VPY) gpu_worker/shim/build.py

# An editable install installs no data files: the server extension's enabling config goes where
# jupyter_server reads it in this venv (a wheel installs it through pyproject's data-files).
SERVER_CONFIG := $(VENV)/etc/jupyter/jupyter_server_config.d/gpulab.json
# The GPU goals skip this and the kernelspec below (their NEEDS reaches these recipes): the device
# machine carries no Jupyter server or jupyter_client (docs/validation.md).
$(SERVER_CONFIG): server_extension/jupyter-config/jupyter_server_config.d/gpulab.json | $(PIP_STAMP)
	@[ "$(NEEDS)" = gpu ] || { mkdir -p $(dir $@) && cp $< $@; }

# The "Python 3 (vGPU)" kernelspec in this venv, where the lab's single-user servers find it (docs/ide.md).
KERNELSPEC := $(VENV)/share/jupyter/kernels/python3-vgpu/kernel.json
$(KERNELSPEC): server_extension/kernelspec.py | $(PIP_STAMP)
	[ "$(NEEDS)" = gpu ] || $(VENV)/bin/gpulab kernelspec install --sys-prefix

# The JupyterLab front end (labextension/, TypeScript): npm ci and the JupyterLab builder, through
# tools/build_labextension.py, when its sources change; then linked where this venv's JupyterLab
# looks for prebuilt extensions (a wheel carries the build instead: setup.py). The GPU goals skip it
# (their NEEDS reaches these recipes; the device machine has no Node.js).
SRC_LAB := $(addprefix labextension/,package.json package-lock.json tsconfig.json) \
	$(wildcard labextension/src/*.ts labextension/style/* labextension/schema/*.json)
LAB_BUILT := server_extension/labextension/package.json
LAB_LINK := $(VENV)/share/jupyter/labextensions/@gpulab/vgpu-panel
$(LAB_BUILT): $(SRC_LAB) tools/build_labextension.py | $(PIP_STAMP)
	[ "$(NEEDS)" = gpu ] || $(VPY) tools/build_labextension.py

labextension: $(LAB_BUILT)
	@[ "$(NEEDS)" = gpu ] || [ "$$(readlink '$(LAB_LINK)')" = "$(CURDIR)/server_extension/labextension" ] || \
		{ mkdir -p '$(dir $(LAB_LINK))' && rm -rf '$(LAB_LINK)' && \
		  ln -s '$(CURDIR)/server_extension/labextension' '$(LAB_LINK)'; }

build: install gpu_worker/shim/lib/libcuda.so.1 $(SERVER_CONFIG) $(KERNELSPEC) labextension

# Regenerate the C stubs and the Python dispatch from gpu_worker/api/table.py (standard library only).
generate:
	$(PYTHON) -m gpu_worker.api.codegen

bench: build
	$(VPY) benchmarks/remote_driver.py
	$(VPY) benchmarks/spawn.py

# Wheels of the project's dependencies that the device machine's image lacks, for WHEELHOUSE=.whl
# there (run here, where pip can download; the device runs Python 3.12 on x86-64). Its image has
# setuptools and wheel, which build the project there without build isolation.
DEVICE_WHEELS ?= traitlets prometheus-client
wheelhouse: $(VENV)/pyvenv.cfg
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(or $(WHEELHOUSE),.whl) $(DEVICE_WHEELS)

FORCE:

clean:
	rm -rf $(STAMP) gpu_worker/shim/lib build *.egg-info server_extension/labextension labextension/lib labextension/tsconfig.tsbuildinfo
