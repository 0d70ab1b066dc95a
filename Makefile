# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (every test).
# Each creates the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# every distribution in the repository, installed editable (tools/build_wheels.py lists the same ones)
PACKAGES := . $(dir $(wildcard backends/*/pyproject.toml)) compressors optimizers transports launcher integrations/torch
# what only the tests need: a stand-in third-party plugin package (stores listsum, optimizer halfsign, ...),
# kept out of `make demo`'s environment so that it never shows up among a user's plugins
TEST_PACKAGES := tests/plugins
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WHEELHOUSE ?= wheelhouse

.PHONY: setup demo test wheels lint typecheck bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(wildcard backends/*/pyproject.toml) compressors/pyproject.toml optimizers/pyproject.toml transports/pyproject.toml launcher/pyproject.toml integrations/torch/pyproject.toml requirements-dev.txt | $(PY)
	@echo "installing kvframe's packages into $(VENV) (log: $(VENV)/install.log)"
	@( $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q -r requirements-dev.txt $(foreach p,$(PACKAGES),-e $(p)) ) > $(VENV)/install.log 2>&1 \
	   || { cat $(VENV)/install.log; echo "installation failed (log above)"; exit 1; }
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) $(TEST_PACKAGES:=/pyproject.toml)
	@( $(PY) -m pip install -q $(foreach p,$(TEST_PACKAGES),-e $(p)) ) >> $(VENV)/install.log 2>&1 \
	   || { cat $(VENV)/install.log; echo "installation of the test plugins failed (log above)"; exit 1; }
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) examples/train_digits.py

test: $(TEST_STAMP)
	$(PY) -m pytest -q -ra tests

# every distribution's wheel into $(WHEELHOUSE)/; then: pip install --find-links $(WHEELHOUSE) 'kvframe[all]'
wheels: | $(PY)
	$(PY) tools/build_wheels.py --out $(WHEELHOUSE)

# ruff, then the type check (CI runs both; each must be clean)
lint: $(STAMP)
	$(VENV)/bin/ruff check kvframe backends transports launcher compressors optimizers integrations tests benchmarks examples
	$(MAKE) --no-print-directory typecheck

# every package of the repository, as [tool.mypy] in pyproject.toml lists them
typecheck: $(STAMP)
	$(VENV)/bin/mypy --config-file pyproject.toml

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(WHEELHOUSE)
