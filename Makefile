# Two commands for a fresh machine with Python 3 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench crossval clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) driver.py --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench.py

SAMPLE ?= ../shared/data/isic2020-sample
crossval: $(VENV)/.installed
	$(PY) crossval.py --data-dir $(SAMPLE) --profile cpu --no-tsne --cv-out runs/crossval

clean:
	rm -rf runs cache data/demo
