# The two commands of the README: `make demo` and `make test`. Each creates .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned here only for this repo's own environment (the package itself declares loose ranges)
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv  ## synthetic set: train global + fusion, compare, draw attention overlays (runs/demo)
	$(PY) -m finescope demo --out runs/demo

test: venv  ## the whole suite (real-data tests skip when ../shared is absent); no test collected fails too
	@$(PY) -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

test-fast: venv  ## without the slow and real-data tests
	$(PY) -m pytest -q -m "not slow and not realdata"

lint: venv
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
