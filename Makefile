VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAUNCHER := $(VENV)/bin/ondeck-launch

.PHONY: install run test lint bench clean

install: $(STAMP) $(LAUNCHER)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The program that starts each run (PID namespace, limits, one exec). It links no C
# library at all (see launch.c), so starting it costs neither linking nor glibc's start-up;
# without a C compiler, or on a CPU other than x86-64 and AArch64, runs start through
# setpriv, unshare and prlimit instead (about 2 ms more CPU each).
$(LAUNCHER): src/ondeck/runner/launch.c $(STAMP)
	$(CC) -O2 -Wall -Wextra -static -nostdlib -ffreestanding -fno-builtin -fno-stack-protector -o $@ $< \
		|| echo "warning: cannot build ondeck-launch; runs will start through setpriv/unshare/prlimit"

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
