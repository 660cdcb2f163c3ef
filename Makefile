# Each target builds its own virtual environment from scratch on first use (torch, timm, TensorFlow).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# pip compiles every installed module to bytecode one after another (35 of the install's 90 seconds on 2 cores);
# compileall does the same on every core. (Left to first import instead, torch and TensorFlow are compiled by each
# of the test workers and children that start at once: a minute more.) A file it cannot compile, such as one for
# a newer Python, is left to import time, as pip leaves it.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --no-compile -e '.[keras,train,export,dev]'
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
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
