# Each target builds its own virtual environment from scratch on first use (torch, timm, TensorFlow).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# tools/install_venv.py: uv installs what pip would (pip's indexes and constraints), on every core, with the
# bytecode compiled in parallel: about 45 s instead of pip's 75 s for torch's CUDA build and TensorFlow.
$(STAMP): pyproject.toml tools/install_venv.py
	python3 -m venv $(VENV)
	$(PY) tools/install_venv.py -e '.[keras,train,export,dev]'
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
