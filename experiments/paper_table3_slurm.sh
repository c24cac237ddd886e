#!/usr/bin/env bash
# Table 3 (restricted setting) at paper scale on SLURM: each baseline learns p on 0.5x the steps, then
# the full run trains on it, and again with Aioli adjusting it. Re-run after the jobs end to build
# results/table3.*.
#   PARTITION=<partition> [ACCOUNT=<account>] [SEEDS=5] bash experiments/paper_table3_slurm.sh [reproduce args]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PARTITION:?set PARTITION to your SLURM partition}"
args=(table3 --scale paper --launcher slurm --seeds "${SEEDS:-5}" "hydra.launcher.partition=$PARTITION")
if [ -n "${ACCOUNT:-}" ]; then args+=("hydra.launcher.account=$ACCOUNT"); fi
exec "${PY:-.venv/bin/python}" -m aioli_repro.reproduce "${args[@]}" "$@"
