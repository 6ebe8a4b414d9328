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
# MathJax 3, served by the site itself (no CDN): npm puts it under .cache/mathjax, _config.yml's
# html_static_path copies it into _build/html/_static/mathjax and mathjax_path points there.
MATHJAX_VERSION := 3.2.2
MATHJAX := .cache/mathjax/node_modules/mathjax/es5/tex-chtml.js
# system packages (npm, chromium) come from Debian's apt; as root directly, otherwise through sudo
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# nbval re-runs the committed chapters and compares the cells tagged nbval-check-output
NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg -p no:cacheprovider
# the browser test (tests/test_site.py) drives Debian's chromium through playwright
CHROMIUM := /usr/bin/chromium

.PHONY: test nbval book chapters html install mathjax browser clean bench help

help:
	@echo "make test   - install into .venv and run every test (tests/, then nbval on the committed chapters)"
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

$(MATHJAX):
	@command -v npm >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq npm; }
	npm install --prefix .cache/mathjax --no-audit --no-fund --silent mathjax@$(MATHJAX_VERSION)
	@test -f $@

mathjax: $(MATHJAX)

# only when missing: an existing chromium is left as it is
$(CHROMIUM):
	$(APT) update -qq && $(APT) install -y -qq chromium

browser: $(CHROMIUM)

# two runs: the test suite (tests/, the browser test included), then nbval on the committed chapters
test: $(STAMP) $(MATHJAX) $(CHROMIUM)
	$(PY) -m pytest -q
	$(PY) -m pytest -q $(NBVAL) book/

nbval: $(STAMP)
	$(PY) -m pytest -q $(NBVAL) book/

chapters: $(STAMP)
	@for nb in $(CHAPTERS); do \
	  start=$$(date +%s); \
	  $(PY) -m papermill --kernel $(KERNEL) --cwd book --no-progress-bar "$$nb" "$$nb" --log-level ERROR || exit 1; \
	  echo "executed $$nb in $$(( $$(date +%s) - start )) s"; \
	done

html: $(STAMP) $(MATHJAX)
	$(VENV)/bin/jupyter-book build . --path-output . --warningiserror --keep-going

book: chapters html
	@echo "site: _build/html/index.html"

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf _build .pytest_cache .cache
