# The two commands of the README, each installing what it needs on a fresh machine:
#   make quickstart   # the main job: lia run configs/quickstart.yaml on embedded defaults
#   make test         # the test suite
VENV ?= .venv
PYTHON ?= python3
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup quickstart test lint clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -d $(FASHION_DIR) ]; then \
	  echo "installing Debian package dataset-fashion-mnist (Fashion-MNIST IDX files)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "warning: could not install dataset-fashion-mnist; stream.source=fashion_mnist will be unavailable"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/lia run configs/quickstart.yaml

test: setup
	$(VENV)/bin/pytest -q


lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-results:
	rm -rf mlflow.db .mlflow.db.lock mlruns mlartifacts reports checkpoints
