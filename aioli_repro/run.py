"""Run a method end to end for one setting and seed:

    python -m aioli_repro.run method=<name> groups=<setting> seed=<s> scale=tiny [results_dir=PATH]

Prints the final per-group test perplexity, `test/avg_ppl`, and the path of the pipeline's summary.json.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from aioli_repro import world
from aioli_repro.config import register_resolvers, user_error_exit
from aioli_repro.pipeline.recipes import run_method
from aioli_repro.training.preflight import USER_ERRORS, build, report_data
from aioli_repro.training.run_dirs import default_layout, remove_if_unused
from aioli_repro.training.summary import format_summary

# an entry point: Hydra resolves run_name (the setting_key resolver) before main runs, and a SLURM job
# imports this module to run main, so registering here covers both
register_resolvers()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    results_dir = Path(cfg.results_dir)
    done = False
    try:
        source = build(cfg.data.source, "data.source")
        report_data(source, list(cfg.groups.names), bool(cfg.get("progress", True)))
        summary, path = run_method(cfg, results_dir)
        done = True
    except USER_ERRORS as e:  # other exceptions are bugs and keep their traceback
        user_error_exit(e)
    finally:  # Hydra's folder for this command (only `.hydra`) records a pipeline that ran; else no debris
        if not done and world.is_launch_zero():
            remove_if_unused(hydra_dir, parent_too=default_layout(hydra_dir, str(cfg.run_name)))
    if not world.is_launch_zero():
        return  # DDP: rank 0 reports the pipeline
    print(format_summary(summary))
    print(
        f"stages: {len(summary['stages'])} ({summary['extra_runs']} extra runs), "
        f"total tokens {summary['total_tokens']:,}"
    )
    print(f"summary: {path}")


if __name__ == "__main__":
    main()
