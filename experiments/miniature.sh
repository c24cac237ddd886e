#!/usr/bin/env bash
# The Table 2 miniature of docs/miniature.md, as committed under docs/results/tiny/: the headroom grid first
# (Table 2's grid search reuses its runs), then Table 2, its rows for the later methods, then the sensitivity
# study. Each step resumes where it stopped.
#   bash experiments/miniature.sh [extra args for aioli_repro.reproduce, e.g. --n-jobs 2]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/mini}
OUT=${OUT:-docs/results/tiny}

"$PY" -m aioli_repro.reproduce headroom --scale tiny --results-dir "$RESULTS/runs" --out-dir "$OUT" "$@"
"$PY" -m aioli_repro.reproduce table2 --scale tiny --results-dir "$RESULTS/runs" --out-dir "$OUT" "$@"
# Table 2's rows for the methods published after the paper (issue 26); shares Table 2's stratified runs
"$PY" -m aioli_repro.reproduce post --scale tiny --results-dir "$RESULTS/runs" --out-dir "$OUT" "$@"
# Why Aioli ties (issue 25): refined headroom, sensitivity arms, oracle check; shares Table 2's runs
"$PY" -m aioli_repro.sensitivity --scale tiny --results-dir "$RESULTS/runs" --out-dir "$OUT" "$@"
