#!/usr/bin/env bash
# The linear dynamic law's branch sweeps (paper §4) at paper scale on SLURM, one job per setting,
# branching from Table 2's stratified runs (run paper_table2_slurm.sh first). Then execute
# notebooks/mixing_laws.ipynb on results/runs.
#   PARTITION=<partition> [ACCOUNT=<account>] bash experiments/paper_mixing_laws_slurm.sh [hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PARTITION:?set PARTITION to your SLURM partition}"
args=(-m experiment=dynamic_law scale=paper hydra/launcher=slurm_a100 "hydra.launcher.partition=$PARTITION")
if [ -n "${ACCOUNT:-}" ]; then args+=("hydra.launcher.account=$ACCOUNT"); fi
exec "${PY:-.venv/bin/python}" -m aioli_repro.run "${args[@]}" "$@"
