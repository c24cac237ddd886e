"""The refined-headroom search (issue 25): its moves, its acceptance rule, and that the lockstep driver
finds a planted optimum from the grid's start while stopping by the pre-registered rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from aioli_repro.mixing import simplex_search as ss
from aioli_repro.pipeline import refine as rf


def test_neighbours_move_one_group_and_keep_the_others_ratios() -> None:
    c = np.array([2 / 7, 3 / 7, 2 / 7])
    nb = ss.neighbours(c, 1 / 7)
    assert len(nb) == 6
    for q in nb:
        assert abs(q.sum() - 1.0) < 1e-9 and q.min() >= 0.02
    up0 = nb[0]  # raise group 0 by s: the others keep their 3:2 ratio
    assert up0[0] == pytest.approx(3 / 7, abs=1e-6)
    assert up0[1] / up0[2] == pytest.approx(1.5, rel=1e-5)
    down1 = nb[3]  # lower group 1 by s
    assert down1[1] == pytest.approx(2 / 7, abs=1e-6) and down1[0] == pytest.approx(down1[2], abs=1e-6)


def test_neighbours_skip_moves_below_the_floor_and_are_canonical() -> None:
    nb = ss.neighbours(np.array([0.05, 0.475, 0.475]), 0.1)
    assert len(nb) == 5  # lowering group 0 would leave it at -0.05
    for q in nb:
        assert np.array_equal(q, ss.canonical(q))  # printed and re-read, the same point (same stage hash)
    assert len(ss.neighbours(np.full(7, 1 / 7), 0.1)) == 14


def test_accepts_only_beyond_one_standard_error() -> None:
    centre = np.array([20.0, 21.0, 19.0])
    assert ss.accepts(centre - np.array([0.5, 0.45, 0.55]), centre)  # consistently better
    assert not ss.accepts(centre + np.array([-1.5, 1.0, 0.2]), centre)  # mean -0.1, se 0.74
    assert not ss.accepts(centre + 0.1, centre)
    assert ss.choose(centre, [centre + 1, centre - 0.3, centre - 0.2]) == 1
    assert ss.choose(centre, [centre + 1]) is None


def test_search_state_halves_then_stops_by_the_rule() -> None:
    rule = ss.rule_for(3)
    st = ss.SearchState(np.full(3, 1 / 3), rule.step)
    st.advance(rule, None)
    st.advance(rule, None)
    assert not st.done and st.step == pytest.approx(rule.step / 4)
    st.advance(rule, None)
    assert st.done and st.iters == 3
    st7 = ss.SearchState(np.full(7, 1 / 7), ss.rule_for(7).step)
    for q in ss.neighbours(st7.centre, st7.step)[:4]:
        st7.advance(ss.rule_for(7), q)
    assert st7.done and st7.iters == 4  # m = 7: at most 4 iterations even while it keeps moving


def _planted(monkeypatch: pytest.MonkeyPatch, p0: np.ndarray, calls: list[int]) -> None:
    """Replace the runs by a planted val/test surface with common random numbers per seed."""
    offsets = np.array([0.0, 0.4, -0.3])

    def point_runs(setting, p, seeds, base, results_dir):
        job = SimpleNamespace(cfg=SimpleNamespace(groups=SimpleNamespace(names=["a", "b", "c"])))
        return rf.PointRuns(setting, ss.canonical(p), [job])

    def run(points, results_dir, n_jobs, run):
        calls.append(len(points))
        for pt in points:
            noise = np.random.default_rng(abs(hash(tuple(pt.p))) % 2**32).normal(0, 0.02, 3)
            surface = 20.0 + 30.0 * float(((pt.p - p0) ** 2).sum())
            pt.val = surface + offsets + noise
            pt.test = pt.val + 0.1

    monkeypatch.setattr(rf, "point_runs", point_runs)
    monkeypatch.setattr(rf, "_run", run)


def test_refine_finds_a_planted_optimum_from_the_grid_start(monkeypatch: pytest.MonkeyPatch) -> None:
    p0 = np.array([0.55, 0.25, 0.20])
    calls: list[int] = []
    _planted(monkeypatch, p0, calls)
    (x,) = rf.refine(["a_b_se"], [0, 1, 2], [], rf.Path("."), log=lambda s: None)
    start = np.array(rf.GRID_BEST["a_b_se"])
    assert x.state.done and x.complete and x.state.iters <= ss.rule_for(3).max_iters
    assert np.abs(x.centre_runs.p - p0).sum() < np.abs(start - p0).sum() / 2
    assert np.abs(x.centre_runs.p - p0).sum() < 0.2
    assert calls[0] == 1 and all(c <= 6 for c in calls[1:])  # the start, then <= 2m candidates a round
    frame = rf.trace_frame([x])
    assert frame.iloc[0]["role"] == "start" and frame["accepted"].sum() >= 2  # the start and >= 1 move


def test_refine_stays_at_the_start_when_it_is_the_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    p0 = np.array(rf.GRID_BEST["cc_gh_w"])
    _planted(monkeypatch, p0, [])
    (x,) = rf.refine(["cc_gh_w"], [0, 1, 2], [], rf.Path("."), log=lambda s: None)
    assert np.allclose(x.centre_runs.p, ss.canonical(p0)) and x.state.iters == 3  # three halvings, stop
