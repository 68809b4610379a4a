# fedkd: the two set-up commands are `make run` and `make test`.
# Both create .venv, install the project with pip (torch and torchvision come from
# the wheels pip is pointed at), and install Fashion-MNIST from Debian's
# dataset-fashion-mnist package when it is missing and apt is usable.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup data run test test-slow test-all lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed data

data:
	@if [ -f $(FMNIST) ]; then \
		echo "Fashion-MNIST: $(dir $(FMNIST))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is not installed and apt is not usable here:"; \
		echo "  install Debian's dataset-fashion-mnist, or set dataset.root=DIR"; \
	fi

run: setup            ## the default experiment (add ARGS="strategy=fedmd rounds=5")
	$(BIN)/fedkd-sim $(ARGS)

test: setup           ## the default test suite (fast and Ray tests, not slow ones)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup      ## the slow tests only
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "no slow tests" && exit 0; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
