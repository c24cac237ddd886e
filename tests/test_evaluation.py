"""Held-out evaluation: every group's mean sequence loss from batches that mix the groups, with the
held-out tokens on the device once (EvalSet), not copied from the host for every batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aioli_repro.model import ModelConfig, build_model, lm_token_losses
from aioli_repro.training.evaluation import eval_set, evaluate_groups

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, context_length=16))


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 64, size=(n, 16), dtype=np.uint16) for n in (5, 9, 3)]


def _reference(model: torch.nn.Module, sequences: list[np.ndarray], cap: int | None) -> np.ndarray:
    """Each group on its own: the mean over its first `cap` sequences of their mean token loss."""
    out = []
    with torch.no_grad():
        for a in sequences:
            tokens = torch.from_numpy(a[:cap].astype(np.int64))
            out.append(lm_token_losses(model, tokens).float().mean(dim=1).double().mean())
    return np.array(out)


@pytest.mark.parametrize("cap", [None, 4])
@pytest.mark.parametrize("batch_size", [2, 7, 64])
def test_group_losses_equal_each_group_scored_alone(model, sequences, cap, batch_size) -> None:
    data = eval_set(sequences, CPU, cap)
    assert data.tokens.dtype == torch.int32 and len(data.tokens) == sum(
        min(len(a), cap or 99) for a in sequences
    )
    losses = evaluate_groups(model, data, batch_size)
    np.testing.assert_allclose(losses, _reference(model, sequences, cap), rtol=1e-6)
    assert model.training  # put back in training mode


def test_the_module_puts_held_out_tokens_on_the_device_once(make_cfg, tmp_path) -> None:
    from aioli_repro.training.run import run_training

    seen = []
    import lightning as L

    class Watch(L.Callback):
        def on_train_end(self, trainer, pl_module):
            seen.append(dict(pl_module._eval_sets))

    cfg = make_cfg("train.max_steps=6", "train.val_every=2", "train.checkpoint_every=0")
    run_training(cfg, tmp_path, callbacks=[Watch()])
    # the periodic val passes (steps 2 and 4) shared one EvalSet; built for (split, cap) only
    assert list(seen[0]) == [("val", cfg.train.val_max_seqs)]


def test_a_group_without_held_out_sequences_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one held-out sequence"):
        eval_set([np.zeros((2, 4), dtype=np.uint16), np.zeros((0, 4), dtype=np.uint16)], CPU)
