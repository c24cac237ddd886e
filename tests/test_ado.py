"""ADO (mixing/ado.py): the power-law fit, the smoother, the released weight rule, and ADO in training.

Known answers: planted laws L(n) = e^E + e^A n^-α recovered by the fit; the Savitzky-Golay smoother
against scipy's; the proportions rule on a hand-computed case; a hand-driven ADO whose planted loss curves
fall at different rates; and exact resume and no per-step host read in real (12- and 20-step) runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import savgol_filter
from test_pipelines import MICRO
from test_resume import Crash, Interrupt, assert_same_results, ckpt_step, metrics_rows
from test_sync_free_step import guard  # noqa: F401 (the host-read guard fixture)

from aioli_repro.config import ConfigError
from aioli_repro.mixing.ado import (
    ADO,
    ado_distribution,
    clip_min_probability,
    fit_objective,
    fit_power_laws,
    power_law,
    savgol_smooth,
)
from aioli_repro.mixing.base import MixingContext, StepStats
from aioli_repro.pipeline.recipes import recipe_for, run_method
from aioli_repro.pipeline.token_counts import token_prior
from aioli_repro.training.run import run_training

PLANTED = np.array([[2.0, 0.7, 0.25], [3.0, 1.0, 0.4], [4.0, 1.3, 0.55]])  # rows (A, E, α)


# -- the fit and the smoother ------------------------------------------------------------------------
def test_fit_recovers_planted_laws() -> None:
    rng = np.random.default_rng(0)
    n = np.geomspace(1e2, 1e6, 40)
    loss = power_law(PLANTED[:, None, :], n) * np.exp(rng.normal(0.0, 1e-3, (3, 40)))  # 0.1% noise
    params, values = fit_power_laws(n, loss)
    err = np.abs(params - PLANTED)
    assert np.all(err[:, 2] < 0.02) and np.all(err[:, 1] < 0.02) and np.all(err[:, 0] < 0.1), params
    # the optimiser reaches at least the planted parameters' fitting loss
    planted_value, _ = fit_objective(PLANTED, np.log(n)[None].repeat(3, 0), np.log(loss))
    assert np.all(values <= planted_value + 1e-9)


def test_fit_with_per_group_counts() -> None:
    """n_from="domain": each group has its own n axis (K, T)."""
    n = np.stack([np.geomspace(50, 5e5, 30), np.geomspace(10, 1e5, 30), np.geomspace(1e3, 1e7, 30)])
    params, _ = fit_power_laws(n, power_law(PLANTED[:, None, :], n))  # exact curves
    assert np.abs(params[:, 2] - PLANTED[:, 2]).max() < 0.01
    assert np.abs(params[:, 1] - PLANTED[:, 1]).max() < 0.01


def test_savgol_matches_scipy_and_shrinks_to_the_rows() -> None:
    y = np.random.default_rng(1).normal(size=(3, 300)).cumsum(axis=1)
    assert np.abs(savgol_smooth(y, 101, 3) - savgol_filter(y, 101, 3, axis=-1)).max() < 1e-9
    assert np.abs(savgol_smooth(y[:, :20], 101, 3) - savgol_filter(y[:, :20], 19, 3, axis=-1)).max() < 1e-9
    cubic = np.polyval([0.01, -0.2, 1.0, 3.0], np.arange(50.0))
    assert np.abs(savgol_smooth(cubic, 11, 3) - cubic).max() < 1e-9  # a cubic passes unchanged
    assert np.array_equal(savgol_smooth(y[:, :4], 101, 3), y[:, :4])  # 3 rows: no room for a cubic


# -- the released weight rule ------------------------------------------------------------------------
def test_distribution_hand_computed_case() -> None:
    # n = 100 sequences; rate_i = max(α_i, 0.05) * e^A_i * 100^-α_i / 100 (E = 0, so L - e^E = e^A n^-α):
    #   g1: A = ln 2, α = 0.5  -> 0.5 * 2 * 0.1 / 100 = 1.0e-3
    #   g2: A = ln 10, α = 0.02 (floored to 0.05 in the rate) -> 0.05 * 10 * 100^-0.02 / 100 = 4.5601e-3
    #   g3: A = 0, α = 1   -> 1 * 0.01 / 100 = 1.0e-4
    # x prior (0.5, 0.25, 0.25) x credit^0.5 = (0.5, 0.6, 0.7):
    #   (2.5e-4, 6.8401e-4, 1.75e-5), sum 9.5151e-4 -> (0.262740, 0.718869, 0.018392)
    params = np.array([[np.log(2), 0.0, 0.5], [np.log(10), 0.0, 0.02], [0.0, 0.0, 1.0]])
    prior, credit = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.36, 0.49])
    dist = ado_distribution(params, np.full(3, 100.0), prior, credit, 0.5, 0.05, 0.01)
    assert dist == pytest.approx([0.262740, 0.718869, 0.018392], abs=2e-6)
    # with min_prob 0.05 the third is raised to 0.05 and all renormalised by 1.031608
    clipped = ado_distribution(params, np.full(3, 100.0), prior, credit, 0.5, 0.05, 0.05)
    assert clipped == pytest.approx([0.254690, 0.696843, 0.048468], abs=2e-6)


def test_clip_min_probability() -> None:
    assert clip_min_probability(np.array([0.9, 0.095, 0.005]), 0.01) == pytest.approx(
        [0.9 / 1.005, 0.095 / 1.005, 0.01 / 1.005]
    )
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = rng.dirichlet(np.full(7, 0.2))
        q = clip_min_probability(p, 0.01)
        assert q.sum() == pytest.approx(1.0) and q.min() >= 0.01 / (1 + 7 * 0.01) - 1e-12
        assert np.all(np.diff(q[np.argsort(p)]) >= -1e-12)  # order kept


# -- ADO driven by hand on planted loss curves -------------------------------------------------------
def _stats(loss: np.ndarray, counts: np.ndarray) -> StepStats:
    c = torch.tensor(counts, dtype=torch.float32)
    return StepStats(loss_sum=torch.tensor(loss, dtype=torch.float32) * c, count=c, host_count=counts)


def _drive(ado: ADO, steps: range, laws: np.ndarray, counts: tuple[int, int] = (4, 4)) -> None:
    """Steps with each group's loss exactly on its planted law at n = all sequences so far (or, with
    n_from="domain", the group's own sequences so far)."""
    c = np.array(counts)
    for step in steps:
        n = c * step if ado.n_from == "domain" else c.sum() * step
        ado.on_step_end(step, _stats(power_law(laws, n), c))


FAST_SLOW = np.array([[3.0, 0.6, 0.5], [0.0, 1.2, 0.1]])  # fast: big reducible loss, α 0.5; slow: α 0.1


def _ado(**kw) -> ADO:
    opts = dict(warmup_steps=10, start_step=5, fit_every=20, savgol_window=11, fit_stride=2) | kw
    ado = ADO(**opts)
    ado.setup(MixingContext(groups=["fast", "slow"], max_steps=120, batch_size=8, seed=0))
    return ado


def test_ado_moves_p_to_the_group_whose_loss_falls_faster() -> None:
    ado = _ado()
    _drive(ado, range(1, 21), FAST_SLOW)
    assert np.array_equal(ado.proportions(), [0.5, 0.5]) and ado.laws() is None  # no fit before itr 20
    _drive(ado, range(21, 120), FAST_SLOW)
    assert ado.n_fits == 5  # itr 20, 40, 60, 80, 100
    assert np.abs(ado.laws()[:, 2] - FAST_SLOW[:, 2]).max() < 0.02  # α recovered from the history
    before = ado.state_dict()
    _drive(ado, range(120, 121), FAST_SLOW)
    # the released rule, by hand: dist from the laws at n = 960, credit after this step's batch (4, 4)
    credit = 0.9 * np.asarray(before["credit"]) + 0.1 * 0.5
    dist = ado_distribution(ado.laws(), np.full(2, 960.0), np.full(2, 0.5), credit)
    p_avg = np.asarray(before["p_avg"])
    assert ado.proportions() == pytest.approx(0.9 * p_avg + 0.1 * dist, abs=1e-12)
    assert ado.state_dict()["p_avg"] == pytest.approx((1 - 1 / 120) * p_avg + dist / 120, abs=1e-12)
    # fast: rate 0.5 * 20.1 * 960^-0.5 = 0.324; slow: 0.1 * 960^-0.1 = 0.050 -> dist about (0.87, 0.13)
    assert dist[0] == pytest.approx(0.866, abs=0.01) and ado.proportions()[0] > 0.7


def test_domain_counts_fit_each_group_on_its_own_sequences() -> None:
    ado = _ado(n_from="domain")
    _drive(ado, range(1, 62), FAST_SLOW, counts=(6, 2))  # fits at itr 20, 40, 60
    assert np.abs(ado.laws()[:, 2] - FAST_SLOW[:, 2]).max() < 0.02
    # rates at n = (366, 122): fast 0.5 * 20.1 * 366^-0.5 / 366 = 1.43e-3, slow 0.1 * 122^-0.1 / 122 = 5.1e-4;
    # credit^0.5 (0.75, 0.25)^0.5 -> dist about (0.83, 0.17)
    dist = ado_distribution(ado.laws(), np.array([366.0, 122.0]), np.full(2, 0.5), ado.state_dict()["credit"])
    assert dist[0] == pytest.approx(0.83, abs=0.02) and ado.proportions()[0] > 0.6


def test_state_dict_round_trip_is_exact() -> None:
    a, b = _ado(), _ado()
    _drive(a, range(1, 51), FAST_SLOW)  # fits at itr 20 and 40
    b.load_state_dict(a.state_dict())
    _drive(a, range(51, 71), FAST_SLOW)  # and at itr 60
    _drive(b, range(51, 71), FAST_SLOW)
    assert np.array_equal(a.proportions(), b.proportions()) and np.array_equal(a.laws(), b.laws())


def test_prior_options() -> None:
    ctx = MixingContext(groups=["x", "y", "z"], max_steps=10, batch_size=8, seed=0)
    ado = ADO(prior={"z": 1.0, "x": 2.0, "y": 1.0})
    ado.setup(ctx)
    assert ado.proportions() == pytest.approx([0.5, 0.25, 0.25])
    ado = ADO(prior="natural")
    ado.setup(MixingContext(["x", "y", "z"], 10, 8, 0, extras={"token_prior": [0.74, 0.14, 0.12]}))
    assert ado.proportions() == pytest.approx([0.74, 0.14, 0.12])
    with pytest.raises(ConfigError, match=r"^method\.mixer\.prior: 'natural' needs"):
        ADO(prior="natural").setup(ctx)
    with pytest.raises(ConfigError, match=r"^method\.mixer\.prior: must be 3 positive"):
        ADO(prior=[0.5, 0.5]).setup(ctx)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"fit_every": 0}, "fit_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"savgol_window": 100}, "savgol_window"),
        ({"credit_decay": 1.0}, "credit_decay"),
        ({"instant_weight": 0.0}, "instant_weight"),
        ({"n_from": "tokens"}, "n_from"),
        ({"min_prob": 0.4}, "min_prob"),  # >= 1/m for m = 3: checked at setup
    ],
)
def test_bad_options_name_their_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^method\.mixer\.{field}: "):
        ADO(**kw).setup(MixingContext(groups=["x", "y", "z"], max_steps=10, batch_size=8, seed=0))


# -- in training -------------------------------------------------------------------------------------
# fits after the steps with released index itr = 3, 6, 9 (steps 4, 7, 10); checkpoint at step 6
ADO_MICRO = [
    *MICRO,
    "method=ado",
    "hp.ado.warmup_steps=2",
    "hp.ado.start_step=1",
    "hp.ado.fit_every=3",
    "hp.ado.savgol_window=5",
    "hp.ado.fit_stride=1",
    "hp.ado.prior=null",  # run_training directly: no pipeline to read the token prior (test_pipeline_...)
]


@pytest.fixture(scope="module")
def ado_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from conftest import compose_config

    d = tmp_path_factory.mktemp("ado_run")
    cfg = compose_config("scale=tiny", f"cache_dir={cache_dir}", "progress=false", "logger=none", *ADO_MICRO)
    return run_training(cfg, d), d


def test_training_run_changes_p_after_the_first_fit(ado_run, make_cfg) -> None:
    s, d = ado_run
    assert recipe_for(make_cfg(*ADO_MICRO)).__name__ == "learn_ado"
    traj = s["trajectory"]
    assert [t["step"] for t in traj] == [0, *range(4, 12)]  # uniform until the first fit, then every step
    assert traj[0]["p"] == {"arxiv": 0.5, "stackexchange": 0.5}
    for t in traj:
        p = np.array(list(t["p"].values()))
        assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0) and p.min() >= 0.01 / 1.02
    assert abs(traj[-1]["p"]["arxiv"] - 0.5) > 1e-3
    fits = [r for r in metrics_rows(d) if "ado/alpha/arxiv" in r]
    assert [r["step"] for r in fits] == [4, 7, 10]
    assert all(0 <= r["ado/alpha/arxiv"] <= 0.8 + 1e-6 and r["ado/E/arxiv"] >= 0.5 - 1e-6 for r in fits)


def test_kill_and_resume_is_bitwise(ado_run, make_cfg, tmp_path: Path) -> None:
    ref, ref_dir = ado_run
    cfg = make_cfg(*ADO_MICRO)
    with pytest.raises(Crash):  # crash in step 9: resumes from the checkpoint at step 6, refits at step 7
        run_training(cfg, tmp_path, callbacks=[Interrupt(8, "crash")])
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 6
    s = run_training(cfg, tmp_path)
    assert s["resumed_from"] is not None
    assert_same_results(ref, s)
    assert metrics_rows(tmp_path) == metrics_rows(ref_dir)


def test_no_host_read_between_fits(guard, make_cfg, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """The history is read back only inside the refit (itr % fit_every == 0), never in another step."""
    refit_steps: list[int] = []
    refit = ADO._refit

    def allowed_refit(self: ADO, itr: int) -> None:
        assert itr % self.fit_every == 0
        refit_steps.append(itr + 1)
        guard.allowed(refit)(self, itr)

    monkeypatch.setattr(ADO, "_refit", allowed_refit)
    overrides = ["hp.ado.warmup_steps=2", "hp.ado.start_step=1", "hp.ado.fit_every=3", "hp.ado.fit_stride=1"]
    overrides.append("hp.ado.prior=null")
    # the GPU step (the guard sets sync_free; fused AdamW) in fp32: bf16 autocast on a CPU is slow
    gpu_fp32 = [
        "trainer.fused_optimizer=true",
        "train.val_every=0",
        "train.checkpoint_every=4",
        "train.val_max_seqs=8",
    ]
    gpu_fp32.append("train.test_max_seqs=8")
    cfg = make_cfg(*gpu_fp32, "train.max_steps=8", "train.log_every=4", "method=ado", *overrides)
    s = run_training(cfg, tmp_path, callbacks=[guard])
    assert s["steps"] == 8 and guard.steps_checked == 6  # steps 3..8
    assert refit_steps == [4, 7]
    assert abs(s["final_proportions"]["arxiv"] - 0.5) > 1e-4


def test_pipeline_starts_from_the_token_prior(make_cfg, tmp_path: Path) -> None:
    """The released default prior (the groups' training-token shares) reaches the run through the pipeline,
    and the run trains on it until the first fit."""
    cfg = make_cfg(*[o for o in ADO_MICRO if o != "hp.ado.prior=null"], "groups=cc_gh_w")
    prior = token_prior(cfg)
    assert abs(prior[0] - 1 / 3) > 0.05  # commoncrawl holds most of the synthetic tokens
    s, _ = run_method(cfg, tmp_path, log=lambda _: None)
    stage = json.loads((Path(s["run_dir"]) / "stage.json").read_text())
    assert stage["extras"]["token_prior"] == pytest.approx(prior.tolist(), abs=1e-12)
    first = s["trajectory"][0]
    assert first["step"] == 0 and list(first["p"].values()) == pytest.approx(prior.tolist(), abs=1e-9)
    assert s["extra_runs"] == 0 and np.isfinite(s["test/avg_ppl"])
