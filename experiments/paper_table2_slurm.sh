#!/usr/bin/env bash
# Table 2 at paper scale on SLURM (160M, SlimPajama-6B): one job per pipeline, m = 2, 3 on RTX 6000
# Ada nodes and m = 7 on A100 80GB nodes. Submits and returns. Follow with `... reproduce table2 --scale paper
# --status`; re-run this script to resubmit failed jobs; `--collect` builds results/table2.* from what has
# finished (all done: a re-run builds it too).
#   PARTITION=<partition> [ACCOUNT=<account>] [SEEDS=5] bash experiments/paper_table2_slurm.sh [reproduce args]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PARTITION:?set PARTITION to your SLURM partition}"
args=(table2 --scale paper --launcher slurm --seeds "${SEEDS:-5}" "hydra.launcher.partition=$PARTITION")
if [ -n "${ACCOUNT:-}" ]; then args+=("hydra.launcher.account=$ACCOUNT"); fi
exec "${PY:-.venv/bin/python}" -m aioli_repro.reproduce "${args[@]}" "$@"
