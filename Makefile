# Two commands for a fresh machine: `make demo` (set up + run the main job on the tiny model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): requirements_npu.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# The tiny random-weight model gives noise, not a real edit: it proves the whole path runs.
demo: setup
	mkdir -p results
	$(PY) device_utils.py
	$(PY) inference_e1_1_npu.py --tiny --image assets/sample.png --instruction "make the sky purple" \
		--output results/demo_e1_1.png --overwrite

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
