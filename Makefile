# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
export MUJOCO_GL ?= egl
export SDL_VIDEODRIVER ?= dummy
export PYTHONHASHSEED ?= 0

.PHONY: venv quickstart test clean

# The stamp file depends on pyproject so a dependency change re-installs.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)          # pinned first: an unpinned torch pulls a CUDA build
	$(BIN)/pip install -q -e ".[sim,test]"
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(BIN)/dap quickstart --out runs/quickstart

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
