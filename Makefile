# Two entry points on a fresh machine:  `make run` (default benchmark)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run report test smoke pull lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

run: setup  ## the embedded default benchmark (scikit-learn digits, CPU) end to end
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all

report: setup  ## the self-contained HTML report of the default run (after `make run`)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --report results/report.html

test: setup  ## unit tests + the smoke workflow (+ its HTML report in headless chromium) + the DVC round trip
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -ra --durations=10 tests

smoke: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --configfile configs/smoke.yaml

pull: setup  ## fetch the DVC-versioned results and mark them up to date for Snakemake
	PATH=$(abspath $(BIN)):$$PATH scripts/dvc-pull

lint: setup  ## ruff (lint + format), snakefmt, the import layers (.importlinter), snakemake --lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/lint-imports
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
