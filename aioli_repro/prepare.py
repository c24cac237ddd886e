"""Tokenise and pack, once, every group the runs of a config need, in parallel:

    python -m aioli_repro.prepare [--workers N] [hydra overrides]     # = make prepare ARGS="..."

It reads the training config (conf/train.yaml: the same `scale`, `data`, `groups`, `cache_dir`, ...
overrides as `python -m aioli_repro.train`), so it writes exactly the cache entries those runs look for,
and they pack nothing. Run it once on a node with network: with `data=slimpajama` it downloads
SlimPajama-6B and the HF tokenizer. For example

    make prepare ARGS="scale=paper groups=slimpajama_all"      # the 7 groups every paper run uses
    python -m aioli_repro.prepare --workers 4 scale=paper groups=a_b_se

`--workers N` (read here, before Hydra parses the rest): processes packing groups at once, one per group;
default every core this process may use. A group already prepared is verified (sha256) and skipped; a
killed prepare, run again, does only the groups it had not finished (`aioli_repro/data/prepare.py`).
Exit status: 0, 1 if a group failed (the others are kept), 2 on a bad config.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from aioli_repro.config import register_resolvers, user_error_exit, validate_config
from aioli_repro.data.prepare import PrepareReport, prepare
from aioli_repro.fileio import shown_path
from aioli_repro.training.preflight import USER_ERRORS, check_data, report_data

_WORKERS: int | None = None  # --workers, taken off the command line before Hydra sees it

# an entry point: Hydra resolves run_name (the setting_key resolver) before main runs, and a SLURM job
# imports this module to run main, so registering here covers both
register_resolvers()


def pop_workers(argv: list[str]) -> int | None:
    """Remove `--workers N` / `--workers=N` from `argv` (in place) and return N (None if absent)."""
    value = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--workers" or arg.startswith("--workers="):
            if arg == "--workers":
                if i + 1 >= len(argv):
                    raise ValueError("--workers: needs a number, e.g. --workers 4")
                value = argv.pop(i + 1)
            else:
                value = arg.split("=", 1)[1]
            argv.pop(i)
            continue
        i += 1
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--workers: must be an integer >= 1, got {value!r}")
    return n


def prepare_from_config(cfg: DictConfig, workers: int | None = None) -> PrepareReport:
    """Check the config as a run would, then prepare its groups with the settings its runs pack with
    (`training.preflight._build_packed`: context length, cache_dir, data.seed)."""
    validate_config(cfg)
    groups = list(cfg.groups.names)
    progress = bool(cfg.get("progress", True))
    source, tokenizer = check_data(cfg, groups)  # data=slimpajama: downloads the tokenizer if not cached
    report_data(source, groups, progress)
    return prepare(
        source,
        tokenizer,
        groups,
        int(cfg.train.context_length),
        cache_dir=cfg.cache_dir,
        seed=int(cfg.data.get("seed", 0)),
        workers=workers,
        rebuild_on_mismatch=bool(cfg.data.get("rebuild_on_mismatch", False)),
        progress=progress,
    )


# A prepare writes nothing in a run folder: Hydra gets none (given first, so the command line's win).
_NO_RUN_DIR = ["hydra.run.dir=.", "hydra.output_subdir=null"]


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        report = prepare_from_config(cfg, _WORKERS)
    except USER_ERRORS as e:
        user_error_exit(e)
    print(f"cache: {shown_path(report.root)} (record of what was verified: prepared.json)")
    if report.failed:
        for r in report.failed:
            rebuild = "rebuild_on_mismatch" in r.error
            hint = " (command line: data.rebuild_on_mismatch=true)" if rebuild else ""
            print(f"error: group {r.group!r}: {r.error.strip()}{hint}", file=sys.stderr)
        print(
            f"error: {len(report.failed)} of {len(report.results)} group(s) failed; the others are kept: "
            "run the same command again to retry only the failed ones",
            file=sys.stderr,
        )
        sys.exit(1)
    print("runs with the same scale/data/groups/cache_dir settings reuse it and pack nothing")


if __name__ == "__main__":
    try:
        _WORKERS = pop_workers(sys.argv)
    except ValueError as e:
        user_error_exit(e)
    sys.argv[1:1] = _NO_RUN_DIR
    main()
