VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/ondeck server

# Load tests assert latency bounds, so they run alone once the parallel suite is done.
test: install
	$(PY) -m pytest -n auto -m "not serial"
	$(PY) -m pytest -m serial

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) .ondeck build *.egg-info src/*.egg-info
