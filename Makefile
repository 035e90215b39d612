# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv (when missing), install, run the CPU quick start
#   make test   - create .venv (when missing), install, lint (ruff), run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install bench bench-matrix clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m x2ct_framework.run recipes/quickstart.toml

# The suite runs on 2 worker processes with one torch thread each (under 10 min on 2 cores); tests marked
# slow (multi-process training, subprocess runs, full-size models) run with `make test-all`.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2

bench: $(STAMP)
	$(PY) -m benchmarks.perf

# The CPU quality matrix the defaults rest on (issue 27: floors, matched baselines, 72 fresh test phantoms,
# the reference's learning curve; about 3 hours on 2 cores; rerun resumes).
bench-matrix: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.variants benchmarks/matrix/cpu_quick.toml --workers 2 --threads-per-worker 1

clean:
	rm -rf runs .pytest_cache
