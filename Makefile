# legokit: `make demo` sets up and runs the quick LEGO experiment; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install only when the package metadata changes; `legokit setup` itself verifies the asset cache.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup install demo test test-fast lab lint bench clean

setup: $(STAMP)
	$(BIN)/legokit setup

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,lab]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/legokit run --config configs/quick.yaml --out runs/quick

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# Unit tests only: no assets needed, a minute or two.
test-fast: install
	$(BIN)/pytest -m "not slow and not notebook and not flower and not browser" $(PYTEST_ARGS)

# configs/jupyterlab/overrides.json: no news or update prompt over the notebook (the browser tests use it too).
lab: setup
	$(BIN)/jupyter lab --LabApp.app_settings_dir=configs/jupyterlab notebooks/

lint: install
	$(BIN)/ruff check legokit tests bench

bench: setup
	$(BIN)/python bench/bench_prune.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_flower.py
	$(BIN)/python bench/bench_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
