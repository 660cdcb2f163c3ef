# Each target builds its own virtual environment from scratch on first use (torch, timm, TensorFlow).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# --no-compile: Python compiles each module on its first import instead; pip would compile every module of
# torch and TensorFlow up front (35 of the install's 90 seconds on 2 cores), most of which are never imported
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --no-compile -e '.[keras,train,export,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/resnetv2-zoo demo

# the whole suite, parity against real Keras included (README's command; CI runs it), in two workers, one per core
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist worksteal

# the edit loop: no Keras (TensorFlow), nothing slow
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist worksteal -m "not keras and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
