# Two commands for a fresh machine with Python 3 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench crossval scale-check gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) driver.py --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed  # everything but the tests that train (marked slow)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

SAMPLE ?= ../shared/data/isic2020-sample
crossval: $(VENV)/.installed
	$(PY) -m experiments.crossval --data-dir $(SAMPLE) --profile cpu --no-tsne --cv-out runs/crossval

# 33,126 generated images of ISIC 2020's shape (kept in data/scale-check for later calls), one epoch of resnet18 at
# 32 px with every default output: the phase table and the peak memory (docs/scale.md).
scale-check: $(VENV)/.installed
	$(PY) -m experiments.scale_check

# On a CUDA machine, with the python3 (and torch) already installed there: no venv, no network; a missing
# pytorch-metric-learning comes from wheels/. Dry run on a CPU:
#   make gpu-check GPU_PY=.venv/bin/python OUT=gpu-check-dry FLAGS="--device cpu --tiny"
GPU_PY ?= python3
OUT ?= gpu-check-out
gpu-check:
	$(GPU_PY) -m experiments.gpu_check --out $(OUT) $(FLAGS)

clean:
	rm -rf runs cache data/demo
