"""Skill-It: graph orientation, the windowed update, the validation cadence, resume, and its configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from aioli_repro.config import SETTINGS
from aioli_repro.mixing.base import MixingContext, StepStats
from aioli_repro.mixing.skillit import SkillIt, lmo_matrix, skills_graph_from_losses

GROUPS3 = ["a", "b", "c"]
# group 0 helps every group; 1 and 2 help mostly themselves (row = trained group)
G_HELPER = [[0.8, 0.6, 0.6], [0.05, 0.3, 0.05], [0.05, 0.05, 0.3]]


def _ctx(m: int = 3, max_steps: int = 600, extras: dict | None = None) -> MixingContext:
    return MixingContext(groups=GROUPS3[:m], max_steps=max_steps, batch_size=8, seed=0, extras=extras or {})


def _stats(m: int) -> StepStats:
    return StepStats(loss_sum=torch.zeros(m), count=torch.zeros(m))


def _val_loss(step: int, p: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for per-group val loss: decays with steps, lower for sampled groups."""
    return 6.0 * np.exp(-step / 400.0) + 2.0 - 0.5 * p


def _drive(method: SkillIt, start: int, stop: int, log: list | None = None) -> list[tuple[int, list[float]]]:
    """The MixingCallback's call order for steps start..stop (start = train start or a resume)."""
    traj, m = [], method.ctx.m
    for step in range(start, stop + 1):
        if step > start:
            method.on_step_end(step, _stats(m))
        if method.needs_validation(step):
            method.on_validation(step, _val_loss(step, method.proportions()))
        metrics = method.log_metrics()
        if log is not None and metrics:
            log.append((step, metrics))
        if step < method.ctx.max_steps:
            traj.append((step, method.proportions().tolist()))
    return traj


def _make(**kw) -> SkillIt:
    args = {"eta": 0.2, "update_steps": 100, "window": 3, "eval_every": 50, "graph": G_HELPER}
    args.update(kw)
    return SkillIt(**args)


# -- graph --------------------------------------------------------------------------------------------
def test_graph_orientation_hand_example():
    L_start = np.array([[10.0, 10.0], [10.0, 10.0]])
    L_end = np.array([[4.0, 8.0], [9.0, 5.0]])  # run 0 trained on group 0, run 1 on group 1
    G = skills_graph_from_losses(L_start, L_end)
    np.testing.assert_allclose(G, [[0.6, 0.2], [0.1, 0.5]])  # G[0, 1]: group 1's drop when training on 0
    A = lmo_matrix(G, np.array([2.0, 3.0]))  # A_ij = L_i · G[j, i]: how training on j lowers loss i
    np.testing.assert_allclose(A, [[2 * 0.6, 2 * 0.1], [3 * 0.2, 3 * 0.5]])


def test_missing_graph_names_the_field():
    with pytest.raises(ValueError, match=r"method\.mixer\.graph"):
        SkillIt(eta=0.2, update_steps=10).setup(_ctx())


def test_graph_sources(tmp_path):
    np.save(tmp_path / "g.npy", np.asarray(G_HELPER))
    (tmp_path / "g.json").write_text(json.dumps({"skills_graph": G_HELPER}))
    for graph in (str(tmp_path / "g.npy"), str(tmp_path / "g.json")):
        s = _make(graph=graph)
        s.setup(_ctx())
        np.testing.assert_allclose(s.G, G_HELPER)
    s = _make(graph=None)
    s.setup(_ctx(extras={"skills_graph": G_HELPER}))
    np.testing.assert_allclose(s.G, G_HELPER)
    with pytest.raises(ValueError, match="matrix"):
        _make(graph=[[1.0, 0.0], [0.0, 1.0]]).setup(_ctx())


# -- the update ---------------------------------------------------------------------------------------
def test_initial_proportions_follow_graph_row_sums():
    s = _make()
    s.setup(_ctx())
    w = np.exp(0.2 * np.asarray(G_HELPER).sum(axis=1))
    np.testing.assert_allclose(s.proportions(), w / w.sum())


def test_helper_group_gains_weight():
    s = _make()
    s.setup(_ctx())
    traj = _drive(s, 0, 600)
    ps = np.array([p for _, p in traj])
    assert np.all(ps[:, 0] > 1 / 3) and np.all(ps[:, 0] > ps[:, 1:].max(axis=1))
    # EGD form (accumulate=True): the helper's share grows every round
    s = _make(accumulate=True)
    s.setup(_ctx())
    p0 = [p[0] for step, p in _drive(s, 0, 600) if step % 100 == 0]
    assert np.all(np.diff(p0) > 0) and p0[-1] > 0.9


def test_update_matches_hand_computation():
    s = _make()
    s.setup(_ctx())
    log: list = []
    _drive(s, 0, 200, log)
    # the update at step 200 uses the window of val losses at steps 100, 150, 200
    assert [st for st, _ in s.history] == [100, 150, 200]
    ell = np.sum([np.asarray(v) for _, v in s.history], axis=0)
    w = np.exp(0.2 * np.asarray(G_HELPER) @ ell)  # p_i ∝ exp(η Σ_j G[i, j] ℓ_j), from ones
    np.testing.assert_allclose(s.proportions(), w / w.sum(), rtol=1e-12)
    # the step-250 evaluation fills the window but p holds until the next round boundary
    traj = _drive(s, 200, 299)
    assert all(np.allclose(p, w / w.sum(), rtol=1e-12) for _, p in traj)
    # log_metrics: A^t = diag(ℓ)·Gᵀ once per update, at steps 100 and 200
    assert [st for st, _ in log] == [100, 200]
    A = lmo_matrix(np.asarray(G_HELPER), ell)
    assert log[1][1]["skillit/A/0_1"] == pytest.approx(A[0, 1])
    assert log[1][1]["skillit/A/2_0"] == pytest.approx(ell[2] * G_HELPER[0][2])
    np.testing.assert_allclose(A.sum(axis=0), np.asarray(G_HELPER) @ ell)  # EGD's Σ_i A_ij


def test_first_update_sums_available_losses_and_mean_option():
    s = _make(window_reduce="mean")
    s.setup(_ctx())
    _drive(s, 0, 100)
    ell = np.mean([np.asarray(v) for _, v in s.history], axis=0)
    assert [st for st, _ in s.history] == [0, 50, 100]
    w = np.exp(0.2 * np.asarray(G_HELPER) @ ell)
    np.testing.assert_allclose(s.proportions(), w / w.sum())
    s = _make(window=5)
    s.setup(_ctx())
    _drive(s, 0, 100)  # only 3 losses exist: the official sum uses what is there
    ell = np.sum([np.asarray(v) for _, v in s.history], axis=0)
    w = np.exp(0.2 * np.asarray(G_HELPER) @ ell)
    np.testing.assert_allclose(s.proportions(), w / w.sum())


def test_validation_cadence():
    s = _make()
    s.setup(_ctx(max_steps=300))
    asked = [st for st in range(0, 301) if s.needs_validation(st)]
    assert asked == [0, 50, 100, 150, 200, 250]  # none at max_steps: no round follows
    assert _make(eval_every=None).eval_every == 50  # default update_steps // 2
    s.on_validation(50, np.ones(3))
    assert not s.needs_validation(50)  # idempotent: the step is already evaluated


def test_round_boundary_without_validation_updates():
    s = _make(eval_every=30)  # boundaries 100, 200 fall between evaluations
    s.setup(_ctx(max_steps=300))
    traj = _drive(s, 0, 300)
    changes = [st for (st, p), (_, q) in zip(traj[1:], traj[:-1]) if p != q]
    assert changes == [100, 200]
    assert s._n_updates == 2


def test_state_round_trip_gives_identical_trajectory():
    full = _make()
    full.setup(_ctx())
    ref = _drive(full, 0, 600)
    for cut in (150, 200, 230):
        a = _make()
        a.setup(_ctx())
        first = _drive(a, 0, cut)
        state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
        b = _make(graph=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # config graph ignored
        b.setup(_ctx())
        b.load_state_dict(state)
        rest = _drive(b, cut, 600)  # the callback re-runs _after_step(cut) at train start
        assert first[:-1] + rest == ref
        assert b.state_dict()["history"] == full.state_dict()["history"]


# -- configs ------------------------------------------------------------------------------------------
def _compose(overrides: list[str]):
    return compose_config(*overrides)


EXPECTED = {  # (update_steps, graph_steps, grid n_runs) per scale and m
    ("paper", 2): (500, 5000, 9),
    ("paper", 3): (500, 5000, 9),
    ("paper", 7): (400, 40000, 10),
    ("tiny", 2): (100, 300, 5),
    ("tiny", 3): (100, 300, 5),
    ("tiny", 7): (100, 300, 5),
}


@pytest.mark.parametrize("scale", ["tiny", "paper"])
@pytest.mark.parametrize("setting", ["a_se", "a_b_se", "slimpajama_all"])
def test_skillit_grid_dml_released_hyper_parameters(scale, setting):
    """Skill-It's rounds and graph runs, and the grid/DML sweep size, per m (composition itself:
    test_config's matrix); an inline graph and the pipeline's graph both reach the method."""
    m = len(SETTINGS[setting])
    graph = np.round(np.eye(m) * 0.6 + 0.1, 3).tolist()
    cfg = _compose([f"scale={scale}", f"groups={setting}", "method=skillit", f"method.mixer.graph={graph}"])
    update_steps, graph_steps, n_runs = EXPECTED[(scale, m)]
    assert cfg.method.name == "skillit"
    assert cfg.method.mixer.update_steps == update_steps and cfg.method.mixer.eta == 0.2
    assert cfg.method.pipeline.graph_steps == graph_steps
    mixer = instantiate(cfg.method.mixer)
    assert isinstance(mixer, SkillIt)
    mixer.setup(MixingContext(list(cfg.groups.names), int(cfg.train.max_steps), 8, 0))
    np.testing.assert_allclose(mixer.G, graph)
    assert mixer.eval_every == (50 if scale == "tiny" else update_steps // 2)
    # without an inline graph the pipeline's extras are used
    cfg2 = _compose([f"scale={scale}", f"groups={setting}", "method=skillit"])
    mixer = instantiate(cfg2.method.mixer)
    mixer.setup(MixingContext(list(cfg.groups.names), 100, 8, 0, extras={"skills_graph": graph}))
    np.testing.assert_allclose(mixer.G, graph)
    # grid and DML share one sweep
    for method in ("grid", "dml"):
        c = _compose([f"scale={scale}", f"groups={setting}", f"method={method}"])
        assert c.method.mixer.proportions is None
        assert c.method.pipeline.n_runs == n_runs == c.hp.grid.n_runs
        assert c.method.pipeline.cover_seed == c.seed
