"""MixMin: the convex solver on planted mixtures of known proxies, and its pipeline at a micro budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from aioli_repro.config import ConfigError, validate_config
from aioli_repro.mixing.mixmin import objective, solve_mixmin, unit_weights
from aioli_repro.pipeline.recipes import run_method
from tests.test_pipelines import MICRO

V = 20  # vocabulary of the synthetic categorical "proxies"


def _proxies(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(V), size=k)  # (k, V), rows sum to 1


def _tokens(p: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(V, size=n, p=p)


def test_recovers_a_planted_token_mixture():
    # target tokens drawn from sum_k w*_k q_k: the released solver (lr 1, 100 steps) reaches the maximum
    # likelihood weights, which lie within sampling error of w* (N = 20000: observed L1 0.034)
    q = _proxies(3)
    w_star = np.array([0.5, 0.3, 0.2])
    logp = np.log(q[:, _tokens(w_star @ q, 20_000, seed=1)])
    fit = solve_mixmin(logp)
    assert fit.iterations == 100 and not fit.stopped_by_tol  # the gradient never nears 0 on the simplex
    assert fit.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(fit.weights - w_star).sum() < 0.06
    long = solve_mixmin(logp, max_steps=400, tol=0.0)
    assert np.abs(fit.weights - long.weights).sum() < 1e-5  # 100 steps have converged
    # the objective is the target's NLL: below each single proxy's, and at w* no better than at the optimum
    singles = [objective(np.eye(3)[k], logp, np.full(logp.shape[1], 1 / logp.shape[1])) for k in range(3)]
    assert fit.objective < min(singles)
    assert fit.objective <= objective(w_star, logp, np.full(logp.shape[1], 1 / logp.shape[1])) + 1e-12


def test_objective_decreases_monotonically():
    q = _proxies(4, seed=2)
    logp = np.log(q[:, _tokens(np.array([0.1, 0.2, 0.3, 0.4]) @ q, 10_000, seed=3)])
    h = np.asarray(solve_mixmin(logp).history)
    assert len(h) == 101 and np.all(np.diff(h) <= 1e-12)
    assert h[0] - h[-1] > 1e-3  # it moved


def test_one_hot_target():
    # tokens of proxy 1 only: its weight goes to 1 (overlapping supports: within sampling error)
    q = _proxies(3)
    fit = solve_mixmin(np.log(q[:, _tokens(q[1], 20_000, seed=4)]))
    assert fit.weights[1] > 0.99
    # disjoint supports: only proxy 1 can produce the target, so the answer is exactly the vertex
    q = np.zeros((3, 3 * V))
    for k in range(3):
        q[k, k * V : (k + 1) * V] = _proxies(1, seed=k)[0]
    with np.errstate(divide="ignore"):
        logp = np.log(q[:, V + _tokens(q[1, V : 2 * V], 2000, seed=5)])
    assert solve_mixmin(logp).weights == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)


def _two_groups(n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Three proxies on disjoint thirds of the vocabulary; group a's tokens from proxy 0, b's from 1."""
    q = np.zeros((3, 3 * V))
    for k in range(3):
        q[k, k * V : (k + 1) * V] = _proxies(1, seed=10 + k)[0]
    x = np.concatenate([_tokens(q[0, :V], n_a, 6), V + _tokens(q[1, V : 2 * V], n_b, 7)])
    with np.errstate(divide="ignore"):
        return np.log(q[:, x]), np.repeat([0, 1], [n_a, n_b])


def test_groups_weigh_equally_whatever_their_size():
    # planted answer: equal group weights give (1/2, 1/2, 0) at any sizes; per-token weights would give the
    # token shares (1/4, 3/4, 0)
    logp, gids = _two_groups(1000, 3000)
    fit = solve_mixmin(logp, unit_weights(gids))
    assert fit.weights == pytest.approx([0.5, 0.5, 0.0], abs=1e-9)
    assert solve_mixmin(logp).weights == pytest.approx([0.25, 0.75, 0.0], abs=1e-9)
    # overlapping proxies: doubling one group's tokens (same per-token distribution) changes nothing
    q = _proxies(3, seed=8)
    xa, xb = _tokens(q[0], 3000, seed=9), _tokens(0.5 * q[1] + 0.5 * q[2], 3000, seed=10)
    once = np.concatenate([xa, xb])
    twice = np.concatenate([xa, xb, xb])
    w1 = solve_mixmin(np.log(q[:, once]), unit_weights(np.repeat([0, 1], [3000, 3000]))).weights
    w2 = solve_mixmin(np.log(q[:, twice]), unit_weights(np.repeat([0, 1], [3000, 6000]))).weights
    assert w1 == pytest.approx(w2, abs=1e-10)
    assert w1[0] == pytest.approx(0.5, abs=0.05)  # group a is proxy 0's half of the target


def test_sequence_units_recover_a_mixture_of_sources():
    # the released LLM objective: whole sequences (8 tokens, each from one source picked with w*), scored
    # by their summed log-probability and divided by their length; the solution is the sources' shares
    q = _proxies(3, seed=11)
    rng = np.random.default_rng(12)
    src = rng.choice(3, size=4000, p=[0.5, 0.3, 0.2])
    seqs = np.stack([rng.choice(V, size=8, p=q[s]) for s in src])
    logp = np.stack([np.log(q[k][seqs]).sum(axis=1) for k in range(3)])
    u = unit_weights(np.zeros(len(seqs)), np.full(len(seqs), 8))
    assert u.sum() == pytest.approx(1 / 8)
    fit = solve_mixmin(logp, u)
    shares = np.bincount(src) / len(src)
    assert np.abs(fit.weights - shares).sum() < 0.03  # observed 0.008: sequences are nearly all identifiable


def test_unit_weights_and_bad_inputs(make_cfg):
    u = unit_weights(np.array([0, 0, 0, 1]))
    assert u == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    logp = np.log(_proxies(2)[:, :5])
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.eg_lr"):
        solve_mixmin(logp, lr=0.0)
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.eg_steps"):
        solve_mixmin(logp, max_steps=0)
    with pytest.raises(ValueError, match="probability 0 under every proxy"):
        solve_mixmin(np.array([[0.0, -np.inf], [0.0, -np.inf]]))
    with pytest.raises(ValueError, match="NaN"):
        solve_mixmin(np.array([[0.0, np.nan]]))
    with pytest.raises(ConfigError, match=r"^method\.pipeline\.logprob_unit: unknown value 'byte'"):
        validate_config(make_cfg("method=mixmin", "hp.mixmin.logprob_unit=byte"))


def test_pipeline_micro(make_cfg, tmp_path):
    cfg = make_cfg("method=mixmin", *MICRO, "hp.mixmin.proxy_steps=6")
    s, _ = run_method(cfg, tmp_path, log=lambda _: None)
    groups = ["arxiv", "stackexchange"]
    assert [st["name"] for st in s["stages"]] == ["mixmin_proxy0", "mixmin_proxy1", "final"]
    assert s["extra_runs"] == 2 and np.isfinite(s["test/avg_ppl"]) and s["test/avg_ppl"] > 1
    for k, st in enumerate(s["stages"][:2]):
        d = Path(st["dir"])
        assert (d / "checkpoints" / "final.ckpt").exists()  # kept: the recipe loads it
        assert not (d / "checkpoints" / "last.ckpt").exists()
        run = OmegaConf.load(d / "config.yaml")
        assert run.train.max_steps == 6 and run.train.warmup_steps == 1  # 2/12 of 6 steps
        assert list(run.method.mixer.proportions) == list(np.eye(2)[k])
    assert not (Path(s["run_dir"]) / "checkpoints" / "final.ckpt").exists()  # the final run's is dropped
    p = np.array([s["learned_proportions"][g] for g in groups])
    assert p.sum() == pytest.approx(1.0) and np.all(p > 0)
    mm = s["mixmin"]
    assert mm["unit"] == "sequence" and mm["iterations"] == 100 and len(mm["history"]) == 101
    assert mm["objective"] <= mm["objective_uniform"] and mm["target_seqs"] == {g: 8 for g in groups}
    assert np.all(np.diff(mm["history"]) <= 1e-12)
    # a second call reuses every stage; token units reuse the proxies and only train a new final run
    again, _ = run_method(cfg, tmp_path, log=lambda _: None)
    assert all(st["reused"] for st in again["stages"])
    assert again["learned_proportions"] == s["learned_proportions"]
    tok, _ = run_method(
        make_cfg("method=mixmin", *MICRO, "hp.mixmin.proxy_steps=6", "hp.mixmin.logprob_unit=token"),
        tmp_path,
        log=lambda _: None,
    )
    assert [st["reused"] for st in tok["stages"]][:2] == [True, True] and tok["mixmin"]["unit"] == "token"
