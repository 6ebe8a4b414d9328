# Two commands do all set-up on a fresh machine with Python 3.10+ and make:
#   make test   create .venv if missing, install everything, run every test
#   make book   create .venv if missing, install everything, execute every chapter, build _build/html
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
CHAPTERS := $(sort $(wildcard book/*.ipynb))
KERNEL := python3

.PHONY: test book chapters html install clean bench help

help:
	@echo "make test   - install into .venv and run every test"
	@echo "make book   - install, execute every chapter with papermill, build _build/html"
	@echo "make bench  - run the benchmark scripts"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so nothing pulls a multi-GB CUDA build; then the package with extras.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev,book]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

chapters: $(STAMP)
	@for nb in $(CHAPTERS); do \
	  echo "executing $$nb"; \
	  $(PY) -m papermill --kernel $(KERNEL) --cwd book "$$nb" "$$nb" --log-level ERROR || exit 1; \
	done

html: $(STAMP)
	$(VENV)/bin/jupyter-book build . --path-output . --warningiserror --keep-going

book: chapters html
	@echo "site: _build/html/index.html"

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf _build .pytest_cache
