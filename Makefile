# Each target builds its own virtual environment from scratch on first use (torch, timm, TensorFlow).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[keras,train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/resnetv2-zoo demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
