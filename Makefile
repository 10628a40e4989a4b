# Two commands for a fresh machine: `make demo` (set up + run the main job on the tiny model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint constraints mutate

setup: $(STAMP)

$(STAMP): requirements_npu.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	touch $(STAMP)

# Refresh constraints.txt: install the newest versions the ranges allow into a scratch venv, run the
# suite there, and only if it passes write its exact versions (torch stays pinned by requirements-dev.txt).
constraints:
	rm -rf .venv-refresh
	$(PYTHON) -m venv .venv-refresh
	.venv-refresh/bin/python -m pip install --quiet --disable-pip-version-check --upgrade -r requirements-dev.txt
	.venv-refresh/bin/python -m pytest -q
	{ sed -n '1,2p' constraints.txt; .venv-refresh/bin/python -m pip freeze --exclude-editable \
		| sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-refresh

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

# Mutation testing (slow, not part of `make test`): plants one bug at a time, reports the survivors.
mutate: setup
	$(PY) tools/mutate.py
