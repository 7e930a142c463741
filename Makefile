# The README's two commands: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/dcgan_synthetic

.PHONY: setup train smoke test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# On x86-64 Linux, setup also installs the CPU kernels (kernels/, gan-cpu-kernels; no pip extra
# can name a local package): their C++ is compiled here, once, against this venv's jax (hence no
# build isolation), so their build requirements (kernels/pyproject.toml) are installed first.
KERNELS_BUILD := 'setuptools>=77' onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0
KERNELS := kernels/pyproject.toml kernels/setup.py kernels/csrc/onednn_conv.cc \
  $(wildcard kernels/gan_cpu_kernels/*.py)

$(VENV)/.installed: setup.cfg pyproject.toml $(KERNELS) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
ifeq ($(shell uname -sm),Linux x86_64)
	$(BIN)/pip install --quiet $(KERNELS_BUILD)
	$(BIN)/pip install --quiet --no-build-isolation ./kernels
endif
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python scripts/train.py --config=configs/dcgan.py:synthetic --workdir=$(WORKDIR)

smoke: setup
	$(BIN)/python scripts/train.py --config=configs/dcgan.py:smoke --workdir=runs/smoke

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything (what CI runs), and the unit tests alone for everyday work; one pytest worker per
# core (pytest-xdist). Tests are spread one by one, except that the files whose tests share a
# module-scoped run mark themselves as one xdist_group, kept on one worker.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup

test: lint
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs
