# The README's two commands: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/dcgan_synthetic

.PHONY: setup train smoke test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python scripts/train.py --config=configs/dcgan.py:synthetic --workdir=$(WORKDIR)

smoke: setup
	$(BIN)/python scripts/train.py --config=configs/dcgan.py:smoke --workdir=runs/smoke

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
