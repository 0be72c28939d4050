# Two commands on a fresh machine with only Python:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="--runslow -x"`.
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

install: $(STAMP)

# torch/torchvision are pinned for the install only (constraints.txt): that pair is known to
# install on our build machines. pyproject.toml keeps honest version ranges for users.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,viz,baselines]"
	touch $(STAMP)

demo: install
	$(PY) -m training.demo --out demo_out

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check shapnets zoo training tests benchmarks

bench: install
	$(PY) -m training bench --out bench_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache .hypothesis
