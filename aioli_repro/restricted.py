"""Paper Table 3's restricted setting, one (method, setting, seed): `aioli_repro.pipeline.restricted`.

    python -m aioli_repro.restricted method=<grid|dml|skillit|doremi|doge> groups=<setting> seed=<s> \
        scale=<scale> [restricted.fraction=0.5] [restricted.prior_steps=N] [results_dir=PATH]
    python -m aioli_repro.restricted -m experiment=table3 scale=paper      # the whole sweep
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from aioli_repro.config import register_resolvers
from aioli_repro.pipeline.restricted import run_restricted

# an entry point: Hydra resolves run_name (the setting_key resolver) before main runs, and a SLURM job
# imports this module to run main, so registering here covers both
register_resolvers()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from aioli_repro.config import user_error_exit
    from aioli_repro.training.preflight import USER_ERRORS
    from aioli_repro.training.run_dirs import default_layout, remove_if_unused

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        out = run_restricted(cfg, Path(cfg.results_dir))
    except USER_ERRORS as e:
        remove_if_unused(hydra_dir, parent_too=default_layout(hydra_dir, str(cfg.run_name)))  # no debris
        user_error_exit(e)
    for variant, (s, path) in out.items():
        print(
            f"{s['method']} ({variant}) on {s['setting']}, seed {s['seed']}: "
            f"test/avg_ppl = {s['test/avg_ppl']:.4f}"
        )
        print(f"summary: {path}")


if __name__ == "__main__":
    main()
