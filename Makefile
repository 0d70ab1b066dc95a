# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (every test).
# Each creates the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# every distribution in the repository, installed editable; the test plugin package too
PACKAGES := . $(dir $(wildcard backends/*/pyproject.toml)) compressors optimizers transports integrations/torch tests/plugins
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard backends/*/pyproject.toml) compressors/pyproject.toml optimizers/pyproject.toml transports/pyproject.toml integrations/torch/pyproject.toml tests/plugins/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing kvframe's packages into $(VENV) (log: $(VENV)/install.log)"
	@( $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q -r requirements-dev.txt $(foreach p,$(PACKAGES),-e $(p)) ) > $(VENV)/install.log 2>&1 \
	   || { cat $(VENV)/install.log; echo "installation failed (log above)"; exit 1; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_digits.py

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

lint: $(STAMP)
	$(VENV)/bin/ruff check kvframe backends transports compressors optimizers integrations tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV)
