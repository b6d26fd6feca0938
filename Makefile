# The two commands of the README, and the steps they share.
#   make serve   set up .venv, build every page, serve at http://127.0.0.1:8000
#   make test    set up .venv, lint, run every test (the strict build included)
#   make build   write the static site to site/
#   make bench   time builds and tests against the goals (README, "Speed")
#   make screenshots  every page, light and dark, phone and laptop, as JPEG
#   make audit   axe-core over every page in those four settings

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup serve build test test-fast lint bench screenshots audit clean

setup: $(INSTALLED)

# Rebuilt whenever requirements.txt changes; the stamp is written only on success.
# --no-compile: pip byte-compiles every module of every package (36 s of an 82 s
# set-up here); Python compiles the few that are imported, on first use.
$(INSTALLED): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "make: need Python 3.11 (torch==2.13.0 is built for it); \
	set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	touch $@

serve: setup
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

build: setup
	$(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint node_modules/.installed
	$(BIN)/python -m pytest

# Clean build, no-change and one-page rebuilds, make test: timed on a copy.
bench: setup
	$(BIN)/python -m sitebuild.bench

# Every page in light and dark, on a phone and a laptop, for a person to look at.
screenshots: build
	$(BIN)/python -m sitebuild.screenshots site

# axe-core over every page, light and dark, laptop and phone (npm: package.json).
node_modules/.installed: package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

audit: build node_modules/.installed
	$(BIN)/python -m sitebuild.audit site

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf site .cache .pytest_cache
