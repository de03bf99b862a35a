# A fresh machine with Python 3 and pip: `make install` (the .venv), then `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench crossval readme-check scale-check gpu-check gpu-bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) driver.py --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile tests

test-fast: $(VENV)/.installed  # everything but the tests that train (marked slow)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

# The real data: a folder in the Kaggle "ISIC 2020 JPG 256x256 RESIZED" layout, from the environment or the make
# command line (make crossval ISIC_DATA=~/isic); the development copy beside the repository otherwise.
ISIC_DATA ?= ../shared/data/isic2020-sample
crossval: $(VENV)/.installed
	$(PY) -m experiments.crossval --data-dir $(ISIC_DATA) --profile cpu --no-tsne --cv-out runs/crossval

# Runs every shell command of README.md on generated demo data.
readme-check: $(VENV)/.installed
	$(PY) -m experiments.readme_check

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

# The GPU measurement in one call of under 10 minutes: benchmark cases and the default run on 33,126 generated images,
# into $(BENCH_OUT)/results.md (docs/speed.md). Dry run on a CPU:
#   make gpu-bench GPU_PY=.venv/bin/python BENCH_OUT=gpu-bench-dry FLAGS="--device cpu --tiny"
BENCH_OUT ?= gpu-bench-out
gpu-bench:
	$(GPU_PY) -m experiments.gpu_bench --out $(BENCH_OUT) $(FLAGS)

clean:
	rm -rf runs cache data/demo
