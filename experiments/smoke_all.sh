#!/usr/bin/env bash
# The smoke test of everything (one seed, 128-step runs, synthetic groups): Table 2, Table 3, the dynamic-law branch sweeps,
# then the four notebooks, executed headless into results/notebooks/.
#   bash experiments/smoke_all.sh [extra args for aioli_repro.reproduce, e.g. --n-jobs 2]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results}

"$PY" -m aioli_repro.reproduce table2 --scale smoke --results-dir "$RESULTS/runs" --out-dir "$RESULTS" "$@"
"$PY" -m aioli_repro.reproduce table3 --scale smoke --results-dir "$RESULTS/runs" --out-dir "$RESULTS" "$@"
# branch sweeps start from the stratified runs Table 2 trained (same scale, same results_dir)
"$PY" -m aioli_repro.run -m experiment=dynamic_law scale=table_smoke results_dir="$RESULTS/runs" \
    hydra.sweep.dir="$RESULTS/multirun/dynamic_law"

mkdir -p "$RESULTS/notebooks"
for nb in table2 table3 trajectories mixing_laws; do
    "$PY" -m papermill --log-level WARNING "notebooks/$nb.ipynb" "$RESULTS/notebooks/$nb.ipynb" \
        -p results_dir "$RESULTS/runs" -p out_dir "$RESULTS"
done
echo "tables and plots: $RESULTS/  executed notebooks: $RESULTS/notebooks/"
