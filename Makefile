# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlplab-installed
# The torch and torchvision releases pip finds on this machine; pyproject.toml declares the compatible ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# data.system_dir of data=fashion_mnist, read from its one place (conf/data/fashion_mnist.yaml)
FASHION_MNIST_SYSTEM_DIR := $(shell sed -n 's/^system_dir: *\([^ ]*\).*/\1/p' conf/data/fashion_mnist.yaml)

.PHONY: setup data train test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,mlflow,wandb,postgres,dashboard]'  # the suite exercises the optional extras too
	touch $@

# Fashion-MNIST offline: the Debian package, when this machine has apt and we may use it.
# Without it, mlplab-train falls back to data/ and then to torchvision's download. In CI (CI=true) its absence fails.
data:
	@if [ -d $(FASHION_MNIST_SYSTEM_DIR) ]; then echo "Fashion-MNIST: $(FASHION_MNIST_SYSTEM_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || { echo "note: apt-get could not install dataset-fashion-mnist"; \
	    if [ "$$CI" = true ]; then echo "error: CI needs the real Fashion-MNIST (tests/test_real_data.py)"; exit 1; fi; }; \
	else echo "note: $(FASHION_MNIST_SYSTEM_DIR) is absent; run 'sudo apt-get install dataset-fashion-mnist' or let torchvision download"; \
	  if [ "$$CI" = true ]; then exit 1; fi; fi

train: setup data
	$(BIN)/mlplab-train $(ARGS)

# Two workers, each stealing tests from the other as it runs out (the slowest take 30 to 70 s). The 15 slowest tests
# are listed at the end, to keep an eye on the total (tests/README.md).
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=15
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

# The edit loop: every module's tests but the slow ones (marked slow: real servers, clusters, data-parallel ranks,
# full sweeps and searches; tests/README.md says which and why), in at most 3 minutes.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist worksteal -m "not slow" --durations=10

# Speed against a bare PyTorch loop (several minutes); the table is printed and saved under benchmarks/results/.
bench: setup data
	$(BIN)/python benchmarks/speed.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
