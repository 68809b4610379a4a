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

.PHONY: setup data run test test-slow test-all lint docs docs-serve bench bench-scale bench-clients bench-bytes clean

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

docs: setup           ## the documentation site into site/ (mkdocs, warnings are errors)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup     ## the documentation site at http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# fedkd-bench workloads behind docs/benchmarks.md (about 40 minutes on 2 cores).
BENCH_DIR ?= docs/bench
SCALE     := experiment=bench
BYTES     := experiment=bench num_clients=100 clients_per_round=2 rounds=2 proxy.subset_size=null
bench: bench-scale bench-clients bench-bytes
	$(BIN)/fedkd-bench summarize $(BENCH_DIR) --out docs/benchmarks.md

bench-scale: setup    ## the simulator against the compute bound, 10 to 10,000 clients
	mkdir -p $(BENCH_DIR)
	$(BIN)/fedkd-bench --name cpr10-n10 --out $(BENCH_DIR)/cpr10-n10.json $(SCALE) num_clients=10 clients_per_round=10
	$(BIN)/fedkd-bench --name cpr100-n100 --out $(BENCH_DIR)/cpr100-n100.json $(SCALE) num_clients=100 clients_per_round=100
	$(BIN)/fedkd-bench --name cpr100-n1000 --out $(BENCH_DIR)/cpr100-n1000.json $(SCALE) num_clients=1000 clients_per_round=100
	$(BIN)/fedkd-bench --name cpr100-n10000 --out $(BENCH_DIR)/cpr100-n10000.json $(SCALE) num_clients=10000 clients_per_round=100
	$(BIN)/fedkd-bench --name cpr1000-n1000 --out $(BENCH_DIR)/cpr1000-n1000.json $(SCALE) num_clients=1000 clients_per_round=1000 rounds=2
	$(BIN)/fedkd-bench --no-bound --name cpr100-n10000-flower-dispatch --out $(BENCH_DIR)/cpr100-n10000-flower-dispatch.json $(SCALE) num_clients=10000 clients_per_round=100 simulation.fast_dispatch=false

bench-clients: setup  ## the same 48,000 images in 10 to 1,000 clients a round, one invocation
	$(BIN)/fedkd-bench clients --out-dir $(BENCH_DIR)

bench-bytes: setup    ## bytes per client per round: each codec, and FedAvg with students of several sizes
	mkdir -p $(BENCH_DIR)
	for codec in float32 float16 int8 onebit; do \
		$(BIN)/fedkd-bench --no-bound --name bytes-dsfl-$$codec-cnn_small --out $(BENCH_DIR)/bytes-dsfl-$$codec-cnn_small.json $(BYTES) strategy.codec=$$codec || exit 1; \
	done
	$(BIN)/fedkd-bench --no-bound --name bytes-dsfl-onebit-up-int8x1000-down-cnn_small --out $(BENCH_DIR)/bytes-dsfl-onebit-up-int8x1000-down-cnn_small.json $(BYTES) strategy.codec=onebit strategy.download_codec=int8 strategy.download_size=1000
	$(BIN)/fedkd-bench --no-bound --name bytes-dsfl-float16-resnet20 --out $(BENCH_DIR)/bytes-dsfl-float16-resnet20.json $(BYTES) model.student=resnet20
	for student in cnn_small resnet8 resnet20 cnn; do \
		$(BIN)/fedkd-bench --no-bound --name bytes-fedavg-$$student --out $(BENCH_DIR)/bytes-fedavg-$$student.json $(BYTES) strategy=fedavg model.student=$$student || exit 1; \
	done

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache site
