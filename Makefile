# triadapt — `make help` lists the targets.
PYTHON ?= python
CONSTRAINTS ?= constraints/cpu.txt
export HF_HUB_OFFLINE ?= 1
DATA ?= ../shared/data

.PHONY: help install test test-fast test-cuda bench sweep-cpu report notebook clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install triadapt + dev tools (CPU torch; CONSTRAINTS= for a GPU machine)
	$(PYTHON) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'

test:  ## the full test suite (real-data tests use $(DATA) when present)
	TRIADAPT_TEST_DATA=$(DATA) $(PYTHON) -m pytest -q

test-fast:  ## unit tests only (skips `slow` real-data / multi-process tests)
	TRIADAPT_TEST_DATA=$(DATA) $(PYTHON) -m pytest -q -m "not slow"

test-cuda:  ## the CUDA tests alone (marker cuda: tests/test_cuda.py, tests/test_step_capture.py; skipped without a GPU)
	$(PYTHON) -m pytest -q -m cuda

sweep-cpu:  ## MiniLM CPU table: cpu_glue (45 jobs) + ablation_triadapt (21), two 1-thread jobs at once, ~3 h; re-run to resume
	OMP_NUM_THREADS=1 $(PYTHON) run.py -m experiment=cpu_glue launcher=joblib paths.output_dir=results data.dir=$(DATA)/glue
	OMP_NUM_THREADS=1 $(PYTHON) run.py -m experiment=ablation_triadapt launcher=joblib paths.output_dir=results data.dir=$(DATA)/glue

BENCH_ARGS ?=
bench:  ## adapter step time/memory vs the frozen floor and peft, into results/bench (BENCH_ARGS=--full: whole sweep)
	TRIADAPT_DATA_DIR=$${TRIADAPT_DATA_DIR:-$(DATA)/glue} $(PYTHON) -m triadapt.bench $(BENCH_ARGS)

report:  ## tables and plots of results/cpu_glue, next to the papers' numbers
	$(PYTHON) -m triadapt.report results/cpu_glue --reference --out results/cpu_glue

NOTEBOOK ?= notebooks/results.ipynb
NOTEBOOK_OUT ?= outputs/notebooks
notebook:  ## execute notebooks/results.ipynb headless into $(NOTEBOOK_OUT)/ (the tracked notebook stays as it is)
	@mkdir -p $(NOTEBOOK_OUT)
	@if $(PYTHON) -c "import nbconvert" 2>/dev/null; then \
		$(PYTHON) -m jupyter nbconvert --to notebook --execute $(NOTEBOOK) --output-dir $(NOTEBOOK_OUT); \
	else \
		$(PYTHON) -c "import sys, os, nbformat; from nbclient import NotebookClient; p, out = sys.argv[1:]; nb = nbformat.read(p, as_version=4); NotebookClient(nb, timeout=1200, kernel_name='python3', resources={'metadata': {'path': os.path.dirname(p) or '.'}}).execute(); dst = os.path.join(out, os.path.basename(p)); nbformat.write(nb, dst); print('executed', p, '->', dst)" $(NOTEBOOK) $(NOTEBOOK_OUT); \
	fi

clean:  ## remove local run outputs
	rm -rf outputs multirun .pytest_cache
