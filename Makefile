# vitlab: `make test` and `make demo` each set up what they need (the virtual environment, the data).
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-stamp
FULL := $(VENV)/.full-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: install install-core test test-fast demo data bench clean

install: $(FULL)
install-core: $(CORE)

# torch and torchvision pinned to the CPU/CUDA wheels this machine keeps on disk, and vitlab with what it needs to
# train (what `make demo` waits for); then the extras of the tests and of `vitlab serve` (what `make test` needs).
$(CORE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

$(FULL): $(CORE)
	$(PY) -m pip install --quiet -e '.[test,serve]'
	touch $(FULL)

# The Debian copy of Fashion-MNIST (the demo's data); installed when missing and we are root.
data:
	@if [ -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null && echo "Fashion-MNIST installed in $(FASHION_MNIST)"; \
	else echo "Fashion-MNIST is not in $(FASHION_MNIST) and we are not root: vitlab will download it with torchvision"; fi

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install-core data
	rm -rf $(DEMO_OUT)  # each demo is a fresh run from scratch
	$(VENV)/bin/vitlab train --preset fashion-mnist-demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
