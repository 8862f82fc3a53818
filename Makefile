# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Where pip finds torch. Empty: the default index (this machine's local CPU wheel, or PyPI's CUDA build);
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build on any Linux machine.
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
export MUJOCO_GL ?= egl
export SDL_VIDEODRIVER ?= dummy
export PYTHONHASHSEED ?= 0

.PHONY: venv quickstart test lint format clean

# The stamp file depends on pyproject so a dependency change re-installs.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_INDEX_ARG) $(TORCH_PIN)   # pinned first: an unpinned torch pulls a CUDA build
	$(BIN)/pip install -q -e ".[sim,test,lerobot]"
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(BIN)/dap quickstart --out runs/quickstart

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests

format: venv
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) runs
