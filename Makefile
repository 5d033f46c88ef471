# triadapt — `make help` lists the targets.
PYTHON ?= python
CONSTRAINTS ?= constraints/cpu.txt
export HF_HUB_OFFLINE ?= 1
DATA ?= ../shared/data

.PHONY: help install test test-fast bench sweep-cpu report notebook clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install triadapt + dev tools (CPU torch; CONSTRAINTS= for a GPU machine)
	$(PYTHON) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'

test:  ## the full test suite (real-data tests use $(DATA) when present)
	TRIADAPT_TEST_DATA=$(DATA) $(PYTHON) -m pytest -q

test-fast:  ## unit tests only (skips `slow` real-data / multi-process tests)
	TRIADAPT_TEST_DATA=$(DATA) $(PYTHON) -m pytest -q -m "not slow"

clean:  ## remove local run outputs
	rm -rf outputs multirun .pytest_cache
