"""The oracle check of Aioli's estimator (results/oracle.py) on planted A's with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aioli_repro.mixing.learn_params import probe_mixtures, solve_A
from aioli_repro.results.oracle import (
    TIDY_COLUMNS,
    block_betas,
    compare_block,
    direction_verdict,
    implied_p,
    oracle_rows,
    oracle_summary,
    tidy,
    train_match,
    write_oracle,
)

# A planted A (row i = eval group, column j = trained group) with distinct column sums, so the implied
# move from uniform has a clear direction; P: the released probe mixtures (f = 0.5).
A_TRUE = np.array([[3.0, 1.0, 0.5], [0.5, 2.0, 0.2], [0.3, 0.4, 1.5]])
P_TRUE = probe_mixtures(3, 0.5)
BETA_TRUE = A_TRUE @ P_TRUE.T  # beta_i = P A_i: probe j lowers loss i by Σ_l A_il P[j, l]
U = np.full(3, 1 / 3)
ETA = 3.0


def _noisy_G(sigma: float, seed: int, k: int = 32) -> np.ndarray:
    """k sweeps of the planted β plus independent N(0, σ²) noise per entry."""
    return BETA_TRUE + sigma * np.random.default_rng(seed).normal(size=(k, 3, 3))


def _block_metrics(sigma: float, reps: int = 20) -> pd.DataFrame:
    """compare_block for every 4-sweep block of `reps` noisy 32-sweep rounds, against the planted A."""
    out = [
        compare_block(solve_A(b, P_TRUE), A_TRUE, ETA, None)
        for rep in range(reps)
        for b in block_betas(_noisy_G(sigma, seed=rep), 4)
    ]
    return pd.DataFrame(out)


# -- the estimator's pieces ------------------------------------------------------------------------------
def test_implied_p_is_the_released_rule_from_uniform():
    # normalize_A leaves diag(1, 0, 0) as is (min 0, sum 1): Σ_i A_ij = (1, 0, 0)
    p = implied_p(np.diag([1.0, 0.0, 0.0]), eta=2.0)
    e = math.exp(2.0)
    np.testing.assert_allclose(p, [e / (e + 2), 1 / (e + 2), 1 / (e + 2)])
    np.testing.assert_allclose(implied_p(np.full((3, 3), 0.7), eta=5.0), U)  # no preference
    np.testing.assert_allclose(implied_p(A_TRUE, eta=0.0), U)  # the null arm
    # the loss scale does not matter (A is normalised first)
    np.testing.assert_allclose(implied_p(A_TRUE * 1e-3, ETA), implied_p(A_TRUE, ETA))


def test_block_betas_split_consecutive_sweeps():
    G = _noisy_G(1.0, seed=0, k=32)
    blocks = block_betas(G, 4)
    assert len(blocks) == 8
    np.testing.assert_allclose(np.mean(blocks, axis=0), G.mean(axis=0))
    np.testing.assert_allclose(blocks[1], G[4:8].mean(axis=0))
    # a remainder is dropped: 34 sweeps still make 8 blocks of the first 32
    assert len(block_betas(_noisy_G(1.0, seed=0, k=34), 4)) == 8
    with pytest.raises(ValueError):
        block_betas(G, 0)


def test_noise_free_blocks_equal_the_oracle():
    G = np.broadcast_to(BETA_TRUE, (32, 3, 3))
    np.testing.assert_allclose(solve_A(G.mean(axis=0), P_TRUE), A_TRUE)
    for b in block_betas(G, 4):
        res = compare_block(solve_A(b, P_TRUE), A_TRUE, ETA, None)
        assert res["r"] == pytest.approx(1.0)
        assert res["sign_agree"] == 1.0
        assert res["p_l1"] == pytest.approx(0.0, abs=1e-12)
        assert res["cos_oracle"] == pytest.approx(1.0)
        assert math.isnan(res["cos_opt"])  # no p*


def test_more_noise_lowers_agreement_with_the_oracle():
    small, mid, large = (_block_metrics(s) for s in (0.05, 0.5, 3.0))
    r = [d["r"].median() for d in (small, mid, large)]
    share = [(d["cos_oracle"] > 0).mean() for d in (small, mid, large)]
    sign = [d["sign_agree"].mean() for d in (small, mid, large)]
    assert r[0] > r[1] > r[2]
    assert sign[0] > sign[1] > sign[2]
    assert share[0] >= share[1] > share[2]
    assert r[0] > 0.99 and share[0] == 1.0  # little noise: the blocks are the oracle


def test_cos_opt_flips_with_a_mirrored_optimum():
    p_oracle = implied_p(A_TRUE, ETA)
    toward, away = U + (p_oracle - U), U - (p_oracle - U)
    A_block = solve_A(block_betas(_noisy_G(0.2, seed=1), 4)[0], P_TRUE)
    a = compare_block(A_block, A_TRUE, ETA, toward)["cos_opt"]
    b = compare_block(A_block, A_TRUE, ETA, away)["cos_opt"]
    assert a > 0 > b
    assert a == pytest.approx(-b)


def test_undefined_correlation_and_direction_are_nan():
    res = compare_block(np.full((3, 3), 2.0), A_TRUE, ETA, U + np.array([0.1, -0.05, -0.05]))
    assert math.isnan(res["r"])  # a constant A has no correlation
    assert math.isnan(res["cos_oracle"]) and math.isnan(res["cos_opt"])  # p_block = u: no direction


# -- reading runs ----------------------------------------------------------------------------------------
UPDATE = 180  # t0 = 84, then 96 probe steps


def _write_run(
    root: Path, method: str, seed: int, G: np.ndarray, train_loss: dict[int, float] | None, P=P_TRUE
) -> Path:
    """A pipeline summary.json (and the run's metrics.jsonl) with one round at step UPDATE."""
    run_dir, pipe_dir = root / f"{method}-s{seed}-run-x", root / f"{method}-s{seed}-pipeline-x"
    pipe_dir.mkdir(parents=True)
    if train_loss is not None:
        run_dir.mkdir(parents=True)
        rows = [{"step": s, "train/loss": v} for s, v in train_loss.items()] + [{"step": 0, "mix/p/a": 0.3}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    G = np.asarray(G, dtype=np.float64)
    summary = {
        "setting": "A/B/SE",
        "method": method,
        "seed": seed,
        # the update step's entry holds the run's own new p: different per run, and not compared
        "trajectory": [
            {"step": 0, "p": {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, "probe": False},
            {"step": 84, "p": {"a": 0.5, "b": 0.25, "c": 0.25}, "probe": True},
            {"step": UPDATE, "p": {"a": float(G[0, 0, 0]), "b": 0.3, "c": 0.3}, "probe": False},
        ],
        "val_history": [[0, [5.0, 5.1, 5.2]], [84, [4.0, 4.1, 4.2]]],
        "method_history": [
            {"step": UPDATE, "round": 0, "beta": G.mean(axis=0).tolist(), "G": G.tolist(), "P": P.tolist()}
        ],
        "run_dir": "/elsewhere/" + run_dir.name,  # an absolute path of another machine: found by its name
    }
    (pipe_dir / "summary.json").write_text(json.dumps(summary))
    return pipe_dir / "summary.json"


LOSSES = {32: 5.6, 64: 5.1, 96: 4.7, 128: 4.4, 160: 4.2}


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    clean = np.broadcast_to(BETA_TRUE, (32, 3, 3))
    runs = [
        # seed 0: noise-free cap blocks, identical training (a later train loss differs: after the update)
        ("oracle_full_t84", 0, clean, {**LOSSES, 192: 4.0}),
        ("oracle_cap_t84", 0, clean, {**LOSSES, 192: 4.1}),
        # seed 1: noisy cap blocks; a train loss inside the window differs
        ("oracle_full_t84", 1, clean, LOSSES),
        ("oracle_cap_t84", 1, _noisy_G(0.5, seed=3), {**LOSSES, 160: 4.25}),
        # seed 2: no full partner
        ("oracle_cap_t84", 2, clean, LOSSES),
        ("aioli", 0, clean, LOSSES),  # not an oracle run
    ]
    rows = [
        {"setting": "A/B/SE", "method": m, "seed": s, "path": str(_write_run(tmp_path, m, s, G, tl))}
        for m, s, G, tl in runs
    ]
    return pd.DataFrame(rows)


def _p_star() -> dict[str, np.ndarray]:
    return {"A/B/SE": implied_p(A_TRUE, ETA)}  # p* in the oracle's direction


def test_oracle_rows_pairs_runs_and_skips_the_unpaired(frame: pd.DataFrame):
    with pytest.warns(UserWarning, match="seed 2 has no full run"):
        rows = oracle_rows(frame, _p_star(), {"A/B/SE": ETA})
    assert len(rows) == 2 * 8
    assert sorted(set(rows["seed"])) == [0, 1] and set(rows["t0"]) == {84}
    assert list(rows.loc[rows["seed"] == 0, "block"]) == list(range(8))
    s0, s1 = rows[rows["seed"] == 0], rows[rows["seed"] == 1]
    np.testing.assert_allclose(s0[["r", "sign_agree", "cos_oracle", "cos_opt"]].to_numpy(), 1.0)
    np.testing.assert_allclose(s0["p_l1"], 0.0, atol=1e-12)
    np.testing.assert_allclose(rows["cos_oracle_opt"], 1.0)  # p* is the oracle's own direction
    assert s0["train_equal"].all() and (s0["train_max_rel_diff"] == 0).all()
    assert not s1["train_equal"].any()
    assert s1["train_max_rel_diff"].iloc[0] == pytest.approx(0.05 / 4.25)
    assert set(rows["train_check"]) == {"train_loss+summary"}
    assert (s1["r"] < 1).all()


def test_train_match_from_the_summary_alone(tmp_path: Path):
    G = np.broadcast_to(BETA_TRUE, (32, 3, 3))
    a = _write_run(tmp_path / "a", "oracle_full_t84", 0, G, None)
    b = _write_run(tmp_path / "b", "oracle_cap_t84", 0, G, None)
    c = _write_run(tmp_path / "c", "oracle_cap_t84", 0, G, None, P=probe_mixtures(3, 0.6))
    sa, sb, sc = (json.loads(p.read_text()) for p in (a, b, c))
    assert train_match(sa, sb, a, b) == (True, 0.0, "summary")
    equal, diff, check = train_match(sa, sc, a, c)  # other realised probe mixtures: other batches
    assert not equal and diff > 0.1 and check == "summary"


def test_oracle_rows_on_an_empty_frame():
    empty = pd.DataFrame(columns=["setting", "method", "seed", "path"])
    assert oracle_rows(empty, {}, {}).empty


# -- tables ----------------------------------------------------------------------------------------------
def _hand_rows() -> pd.DataFrame:
    """2 seeds x 4 blocks at one (setting, t0); cos_oracle_opt and train_equal are per seed."""
    return pd.DataFrame({
        "setting": "A/B/SE", "t0": 84, "seed": [0] * 4 + [1] * 4, "block": [0, 1, 2, 3] * 2, "sweeps": 4,
        "r": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, np.nan],
        "sign_agree": [1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0],
        "p_l1": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        "cos_oracle": [1.0, -1.0, 0.5, np.nan, 0.9, 0.8, 0.7, -0.2],
        "cos_opt": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        "cos_oracle_opt": [0.6] * 4 + [-0.2] * 4,
        "train_equal": [True] * 4 + [False] * 4,
        "train_max_rel_diff": 0.0, "train_check": "summary",
    })  # fmt: skip


def test_oracle_summary_numbers():
    tab = oracle_summary(_hand_rows())
    assert len(tab) == 1
    row = tab.iloc[0]
    assert (row["seeds"], row["blocks"]) == (2, 8)
    assert row["median_r"] == pytest.approx(0.4)  # nan left out
    assert row["median_sign_agree"] == pytest.approx(1.0)
    assert row["median_p_l1"] == pytest.approx(0.45)
    assert row["share_blocks_agree"] == pytest.approx(5 / 8)  # the nan block disagrees
    assert row["mean_cos_oracle_opt"] == pytest.approx(0.2)
    assert row["seeds_oracle_toward_opt"] == 1
    assert row["median_cos_opt"] == pytest.approx(0.45)
    assert not row["train_equal"]


def test_tidy_long_form():
    tab = oracle_summary(_hand_rows())
    long = tidy(tab)
    assert list(long.columns) == TIDY_COLUMNS
    assert len(long) == len(tab.columns) - 2
    assert set(long["arm"]) == {"oracle t0=84"} and set(long["seed"]) == {""}
    assert long["lo"].isna().all() and long["hi"].isna().all()
    assert long.set_index("statistic").loc["share_blocks_agree", "value"] == pytest.approx(5 / 8)


def _summary(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["setting", "t0", "mean_cos_oracle_opt", "share_blocks_agree"])


def test_direction_verdict():
    tab = _summary([
        ("A/B/SE", 84, 0.4, 0.75), ("A/B/SE", 420, 0.1, 0.9),
        ("CC/GH/W", 84, 0.4, 0.7), ("CC/GH/W", 420, -0.1, 1.0),
        ("A/SE", 84, np.nan, 0.8),
    ])  # fmt: skip
    assert direction_verdict(tab, "A/B/SE") == {
        "setting": "A/B/SE", "t0s": [84, 420], "oracle_toward_opt": True, "blocks_agree": True
    }  # fmt: skip
    cc = direction_verdict(tab, "CC/GH/W")
    assert not cc["oracle_toward_opt"] and not cc["blocks_agree"]  # one t0 fails each
    a_se = direction_verdict(tab, "A/SE")
    assert not a_se["oracle_toward_opt"] and a_se["blocks_agree"]  # nan is no direction
    none = direction_verdict(tab, "GH/C4")
    assert none["t0s"] == [] and not none["oracle_toward_opt"] and not none["blocks_agree"]


def test_write_oracle(tmp_path: Path):
    rows = _hand_rows()
    tab = oracle_summary(rows)
    paths = write_oracle(rows, tab, tmp_path / "out")
    assert set(paths) == {"csv", "blocks_csv", "md"}
    long = pd.read_csv(paths["csv"], keep_default_na=False)
    assert list(long.columns) == TIDY_COLUMNS and len(long) == len(tidy(tab))
    assert len(pd.read_csv(paths["blocks_csv"])) == len(rows)
    md = paths["md"].read_text()
    assert "| A/B/SE t0=84 |" in md and "**share_blocks_agree**" in md
    assert not list((tmp_path / "out").glob("*.tmp-*"))
