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
# Each step says what it does: the whole install takes a few minutes and pip is kept quiet.
$(STAMP): pyproject.toml constraints.txt
	@echo "[install 1/4] creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "[install 2/4] upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[install 3/4] installing torch and torchvision (pinned in constraints.txt; the largest download, minutes)"
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	@echo "[install 4/4] installing shapnets (editable) with its dev, viz, shap and baselines extras"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,viz,shap,baselines]"
	touch $(STAMP)
	@echo "[install] done: $(PY) is ready (make test, make demo)"

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
