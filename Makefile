# Two commands matter: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
# Test processes (pytest-xdist); each takes whole test files, so module fixtures are built once.
TEST_WORKERS ?= 2
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tracin-jax demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) -m benchmarks.influence

clean:
	rm -rf $(VENV) runs
