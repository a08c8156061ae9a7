# `make demo` and `make test` each work on a fresh machine: they create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on local disk here; a GPU user sets e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv demo test test-all lint typecheck clean sample-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# dciodvfy (Debian's dicom3tools) validates the DICOM we write, pdftoppm (poppler-utils) renders the
# report's pages for review; the tests that need them skip when absent.
dicom3tools:
	@(command -v dciodvfy && command -v pdftoppm) >/dev/null 2>&1 || \
	  ( (apt-get install -y -qq dicom3tools poppler-utils >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dicom3tools poppler-utils >/dev/null 2>&1)) \
	    || echo "note: dicom3tools/poppler-utils not installed; dciodvfy and page-render tests will be skipped" )

demo: venv
	$(VENV)/bin/medfusion run sample_data/patients --out reports/demo
	$(VENV)/bin/medfusion evaluate --pred reports/demo --labels sample_data/labels --bootstrap 500
	@echo "reports: reports/demo/<patient_id>/report.pdf (first: $$(ls -d reports/demo/*/report.pdf | head -1))"

lint: venv
	$(VENV)/bin/ruff check medfusion tests benchmarks
	$(VENV)/bin/ruff format --check medfusion tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

test: venv dicom3tools lint typecheck
	$(PY) -m pytest -q -x --timeout 600

test-all: venv dicom3tools lint typecheck
	$(PY) -m pytest -q -m "" --timeout 3600

sample-data: venv
	rm -rf sample_data/patients sample_data/labels
	$(VENV)/bin/medfusion synth --n 7 --seed 2026 --out sample_data --size small --sample-plan

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
