"""Paper scale on a cluster, the parts that run anywhere: one-line errors for a GPU or device count that is
not there, the strategy passed to Lightning, the CPU warning, and what a finished stage keeps on disk."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from aioli_repro.config import ConfigError, validate_config
from aioli_repro.pipeline.recipes import run_method
from aioli_repro.training.preflight import check_devices, warn_if_slow_on_cpu
from aioli_repro.training.run import run_training

MICRO = ["train.max_steps=4", "train.checkpoint_every=2", "train.val_every=0", "hp.grid.n_runs=2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_one_line_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^trainer\.accelerator: 'gpu' but no CUDA GPU"):
        check_devices(compose_config("trainer=gpu", "cache_dir=/tmp/x"))


def test_strategy_is_validated_and_passed_to_the_trainer(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^trainer\.strategy: "):
        validate_config(make_cfg("trainer.strategy=bogus"))

    seen: list[str] = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.append(type(trainer.strategy).__name__)

    run_training(make_cfg(*MICRO, "trainer.strategy=single_device"), tmp_path, callbacks=[Record()])
    assert seen == ["SingleDeviceStrategy"]


def test_paper_run_on_a_cpu_warns_once_with_the_projected_time(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without a GPU")
    paper = compose_config("scale=paper", "data=synthetic", "cache_dir=/tmp/x")
    for _ in range(2):
        warn_if_slow_on_cpu(paper, instantiate(paper.model))
    err = capsys.readouterr().err
    assert err.count("warning: no GPU here") == 1
    hours = float(err.split("needs about ")[1].split(" h")[0].replace(",", ""))
    assert 50 < hours < 5000  # 162M parameters x 5000 steps x 8 x 2048 tokens at 100 GFLOP/s: ~220 h
    tiny = compose_config("scale=tiny", "cache_dir=/tmp/x")
    warn_if_slow_on_cpu(tiny, instantiate(tiny.model))
    assert capsys.readouterr().err == ""


def test_finished_stages_keep_only_what_later_stages_load(make_cfg, tmp_path: Path) -> None:
    def files(summary: dict) -> set[str]:
        return {p.name for p in (Path(summary["run_dir"]) / "checkpoints").glob("*.ckpt")}

    strat, _ = run_method(make_cfg("method=stratified", *MICRO), tmp_path / "a", log=lambda s: None)
    assert files(strat) == {"final.ckpt"}  # DoReMi's reference / the dynamic law's parent
    grid, _ = run_method(make_cfg("method=grid", *MICRO), tmp_path / "a", log=lambda s: None)
    assert files(grid) == set() and len(grid["stages"]) == 2
    assert {"summary.json", "metrics.jsonl"} <= {p.name for p in Path(grid["run_dir"]).iterdir()}
    kept_cfg = make_cfg("method=stratified", *MICRO, "keep_checkpoints=true")
    kept, _ = run_method(kept_cfg, tmp_path / "b", log=lambda s: None)
    assert files(kept) == {"final.ckpt", "last.ckpt"}
