"""Shared fixtures: composed configs on the tiny scale with a session-wide data cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aioli_repro.config import CONF_DIR, compose_train

CONF = str(CONF_DIR)  # the package's conf/ (one definition: config.CONF_DIR)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_config(*overrides: str, hydra_cfg: bool = False):
    """The one way tests compose `conf/train.yaml` with overrides (a missing config fails the test)."""
    return compose_train(overrides, return_hydra_config=hydra_cfg)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aioli_cache")


@pytest.fixture
def make_cfg(cache_dir: Path):
    """compose('train', overrides) at tiny scale, quiet, logging to files only."""

    def _make(*overrides: str, wandb: bool = False):
        base = ["scale=tiny", f"cache_dir={cache_dir}", "progress=false", "num_threads=2"]
        if not wandb:
            base.append("logger=none")
        return compose_config(*base, *overrides)

    return _make
