# aioli_repro: the commands a researcher types.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow lint format bench gpu-check clean-cache help compare

help:
	@echo "make setup      create .venv (torch pinned to the local CPU wheel via constraints.txt)"
	@echo "make run        train the CPU default (tiny model, synthetic A/SE, stratified) and print test perplexity"
	@echo "make prepare    download, tokenise and pack every group a config needs, once (clusters: before the sweep)"
	@echo "make test       the default test suite (what CI runs)"
	@echo "make test-slow  the slow end-to-end tests"
	@echo "make lint       ruff"
	@echo "make bench      throughput benchmark -> results/bench.json, docs/benchmarks.md"
	@echo "make gpu-check  on a fresh GPU node, before a sweep (<= 8 min): results/gpu_check/report.{md,json}"
	@echo "make compare RESULTS=DIR   tables and plots of every finished run under DIR (default results/runs)"
	@echo "make headroom / reproduce-table2 / reproduce-table3 SCALE=tiny|smoke|paper   the paper's tables"
	@echo "make reproduce-post SCALE=tiny|paper   Table 2's rows for RegMix, Olmix, MixMin, ADO, UniMax"
	@echo "make sensitivity SCALE=tiny   why Aioli ties at the miniature: refined headroom, sensitivity arms, oracle"
	@echo "make sensitivity-search SCALE=tiny   its first half (references + refined search; then make sensitivity)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the constraints file: anything else pulls several GB of CUDA wheels here
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The CPU default. Extra Hydra overrides: make run ARGS="groups=gh_c4 method=static method.mixer.proportions=[0.3,0.7]"
run: $(STAMP)
	$(PY) -m aioli_repro.train $(ARGS)

# Tokenise + pack, once, every group the runs of a config need, one process per group (on a node with network
# for data=slimpajama; then runs pack nothing): make prepare ARGS="--workers 16 scale=paper groups=slimpajama_all"
.PHONY: prepare
prepare: $(STAMP)
	$(PY) -m aioli_repro.prepare $(ARGS)

# pytest exits 5 when it collects no tests; that is not a failure here.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS) || { rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS) || { rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc; }

lint: $(STAMP)
	$(VENV)/bin/ruff check aioli_repro tests
	$(VENV)/bin/ruff format --check aioli_repro tests

format: $(STAMP)
	$(VENV)/bin/ruff format aioli_repro tests

bench: $(STAMP)
	$(PY) -m aioli_repro.bench $(ARGS)

# A GPU node's check before a sweep: environment, GPU tests, paper-scale bench (eager, compiled), short
# paper-config runs of stratified/aioli/doge/doremi, GPU-hours at the measured rate, a verdict. Without CUDA
# it says so and fails; ARGS=--cpu-rehearsal runs every part on the CPU with the tiny model.
gpu-check: $(STAMP)
	$(PY) -m aioli_repro.gpu_check $(ARGS)

# Compare methods on any finished runs (your own data included): RESULTS/compare/compare.{md,csv,png}, plots
RESULTS ?= results/runs
compare: $(STAMP)
	$(PY) -m aioli_repro.compare $(RESULTS) $(ARGS)

clean-cache:
	rm -rf .cache/aioli

# The paper's tables. SCALE=tiny (the CPU miniature, docs/miniature.md) | smoke (one-seed smoke test) |
# paper (160M, SlimPajama); unset: paper when a CUDA GPU is present, else tiny (the driver prints which).
SCALE ?= auto
.PHONY: reproduce-table2 reproduce-table3 headroom
reproduce-table2: $(STAMP)
	$(PY) -m aioli_repro.reproduce table2 --scale $(SCALE) $(ARGS)

# The best static mixture per setting (a dense grid, 3 seeds): run it before Table 2, which reuses its runs.
headroom: $(STAMP)
	$(PY) -m aioli_repro.reproduce headroom --scale $(SCALE) $(ARGS)

reproduce-table3: $(STAMP)
	$(PY) -m aioli_repro.reproduce table3 --scale $(SCALE) $(ARGS)

# Table 2's rows for the methods published after the paper (RegMix, Olmix, MixMin, ADO, UniMax; issue 26):
# their own command, 3 seeds, paired with Table 2's stratified runs -> <out>/table2_post.{md,csv,png}.
.PHONY: reproduce-post
reproduce-post: $(STAMP)
	$(PY) -m aioli_repro.reproduce post --scale $(SCALE) $(ARGS)

# Why Aioli ties at the miniature (issue 25, docs/miniature.md): the refined headroom (a local search from the
# grid's best point), Aioli's sensitivity arms and the oracle check of its estimator, then their tables.
# SCALE=tiny only (the CPU miniature); ARGS=--dry-run lists what is done, ARGS=--no-run only rebuilds tables.
# On 2 cores the whole study is about 2.5 h of runs: sensitivity-search first (references + search, ~1 h),
# then sensitivity (reuses them; oracle + arms, ~1.5 h) keeps each command under the 150-minute limit.
.PHONY: sensitivity sensitivity-search
sensitivity: $(STAMP)
	$(PY) -m aioli_repro.sensitivity --scale $(if $(filter auto,$(SCALE)),tiny,$(SCALE)) $(ARGS)

sensitivity-search: $(STAMP)
	$(PY) -m aioli_repro.sensitivity --scale $(if $(filter auto,$(SCALE)),tiny,$(SCALE)) --search-only $(ARGS)
