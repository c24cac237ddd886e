"""Sensitivity tables (results.sensitivity) on planted runs: paired Δs, headroom share, L1s, S1/S4/S5, files.

Planted numbers: an arm's test avg ppl is stratified's + a fixed offset + noise centred to mean 0, so every
paired mean is the offset exactly; final mixtures are u + t (p* − u), so L1(p, u) = t L1(u, p*) and
L1(p, p*) = |1 − t| L1(u, p*).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from aioli_repro.results import sensitivity as sens
from aioli_repro.results.load import load_runs

GROUPS = {"A/B/SE": ["arxiv", "book", "stackexchange"], "CC/GH/W": ["cc", "github", "wikipedia"]}
P_STAR = {"A/B/SE": np.array([0.5, 0.2, 0.3]), "CC/GH/W": np.array([0.2, 0.5, 0.3])}
L1_U_PSTAR = {"A/B/SE": 1 / 3, "CC/GH/W": 1 / 3}  # |1/3 − p*_i| summed
SEEDS = range(5)
# arm -> (test ppl offset vs stratified, t per seed: final p = u + t (p* − u), probe se (β = 0.03))
ARMS = {
    "stratified": (0.0, None, None),
    "aioli": (-0.5, [0.1] * 5, 0.01),
    "aioli_eta3x": (-0.2, [0.3] * 5, 0.01),
    "aioli_eta10x": (0.0, [0.6, 0.6, 0.6, -0.2, -0.2], 0.01),  # 3 seeds toward p*, 2 away
    "aioli_eta30x": (0.3, [1.5] * 5, 0.01),
    "aioli_mult": (0.0, [-0.3] * 5, 0.01),  # moves away from p*
    "aioli_evalall": (0.0, [0.1] * 5, 0.0075),  # |β|/se 4 against aioli's 3
}
OPT_OFFSET = {"A/B/SE": -1.25, "CC/GH/W": 0.2}  # p* beats stratified on A/B/SE only


def centred(rng: np.random.Generator, n: int, sd: float) -> np.ndarray:
    x = rng.normal(0, sd, n)
    return x - x.mean()


def history(setting: str, t: float, se: float) -> list[dict]:
    """Two rounds: uniform, then the planted final p; β and se constant so |β|/se = 0.03 / se."""
    m = len(GROUPS[setting])
    u = np.full(m, 1 / m)
    beta, bse = np.full((m, m), 0.03).tolist(), np.full((m, m), se).tolist()
    p = u + t * (P_STAR[setting] - u)
    return [
        {"step": 100 * k, "round": k, "beta": beta, "beta_se": bse, "p": q.tolist()}
        for k, q in ((0, u), (1, p))
    ]


def write_runs(root, arms: dict, reverse_one: bool = False) -> dict:
    """Summaries load_runs reads, under root; returns the planted stratified ppl per setting."""
    ref = {}
    for k, setting in enumerate(GROUPS):
        rng = np.random.default_rng(k)
        ref[setting] = 30 + rng.normal(0, 1, 5)
        for arm, (off, ts, se) in arms.items():
            noise = np.zeros(5) if arm == "stratified" else centred(rng, 5, 0.05)
            for s in SEEDS:
                groups, hist = list(GROUPS[setting]), history(setting, ts[s], se) if ts else None
                if reverse_one and arm == "aioli" and s == 0:  # a summary listing its groups in another order
                    groups, hist[-1]["p"] = groups[::-1], hist[-1]["p"][::-1]
                d = root / f"{arm}-{setting.replace('/', '_')}-pipeline-{s}"
                d.mkdir(parents=True)
                ppl = float(ref[setting][s] + off + noise[s])
                summary = {"setting": setting, "groups": groups, "method": arm, "seed": s, "stages": [],
                           "test/avg_ppl": ppl, "val/avg_ppl": 0.0}  # fmt: skip
                if hist:
                    summary["method_history"] = hist
                (d / "summary.json").write_text(json.dumps(summary))
    return ref


def optimum(ref: dict) -> dict[str, sens.Optimum]:
    rng = np.random.default_rng(9)
    return {
        st: sens.Optimum(P_STAR[st], pd.Series(ref[st][:3] + OPT_OFFSET[st] + centred(rng, 3, 0.05)))
        for st in GROUPS
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    ref = write_runs(root, ARMS, reverse_one=True)
    frame = load_runs(root, "summary")
    opt = optimum(ref)
    return frame, opt, sens.arm_stats(frame, opt)


def row(stats: pd.DataFrame, setting: str, arm: str) -> pd.Series:
    return stats[(stats["setting"] == setting) & (stats["arm"] == arm)].iloc[0]


def test_paired_deltas_and_headroom_share(planted):
    frame, opt, stats = planted
    assert len(stats) == 2 * len(ARMS)
    assert list(stats[stats["setting"] == "A/B/SE"]["arm"]) == list(ARMS)  # study order
    a = row(stats, "A/B/SE", "aioli")
    assert a["n"] == 5 and a["d_strat_n"] == 5
    assert a["d_strat_mean"] == pytest.approx(-0.5, abs=1e-9)
    assert a["d_strat_verdict"] == "better" and a["d_strat_hi"] < 0
    # Δ vs p*: seeds 0–2, by hand from the planted values
    x = frame[(frame["setting"] == "A/B/SE") & (frame["method"] == "aioli")].set_index("seed")["test_avg_ppl"]
    want = float(np.mean(x.loc[[0, 1, 2]].to_numpy() - opt["A/B/SE"].test.to_numpy()))
    assert a["d_opt_n"] == 3 and a["d_opt_mean"] == pytest.approx(want, abs=1e-9)
    assert a["d_opt_mean"] == pytest.approx(0.75, abs=0.2) and a["d_opt_verdict"] == "worse"
    assert a["d_headroom"] == pytest.approx(-1.25, abs=1e-9)
    assert a["share"] == pytest.approx(0.4, abs=1e-9)
    assert row(stats, "A/B/SE", "aioli_eta3x")["share"] == pytest.approx(0.16, abs=1e-9)
    assert row(stats, "A/B/SE", "aioli_eta30x")["d_strat_verdict"] == "worse"
    assert row(stats, "A/B/SE", "aioli_mult")["d_strat_verdict"] == "tie"
    s = row(stats, "A/B/SE", "stratified")
    assert s["d_strat_mean"] == 0 and s["d_strat_verdict"] == "tie"
    # p* worse than stratified on CC/GH/W: no headroom, so no share
    c = row(stats, "CC/GH/W", "aioli")
    assert c["d_headroom"] == pytest.approx(0.2, abs=1e-9) and math.isnan(c["share"])


def test_final_p_and_l1(planted):
    _, _, stats = planted
    for setting in GROUPS:
        u, ps = np.full(3, 1 / 3), P_STAR[setting]
        for arm, (_, ts, _) in ARMS.items():
            r = row(stats, setting, arm)
            t = np.mean(ts) if ts else 0.0  # stratified: uniform
            np.testing.assert_allclose(r["p_final"], u + t * (ps - u), atol=1e-12)
            assert r["l1_u_pstar"] == pytest.approx(L1_U_PSTAR[setting], abs=1e-12)
            assert r["l1_u"] == pytest.approx(abs(t) / 3, abs=1e-12)
            assert r["l1_pstar"] == pytest.approx(abs(1 - t) / 3, abs=1e-12)
            assert r["moved_toward"] == (0 < t < 2)
    e10 = row(stats, "A/B/SE", "aioli_eta10x")
    assert e10["n_toward"] == 3 and e10["moved_toward"]
    assert e10["l1_u_seed_mean"] == pytest.approx((3 * 0.6 + 2 * 0.2) / 5 / 3, abs=1e-12)
    assert row(stats, "A/B/SE", "aioli_mult")["n_toward"] == 0
    assert not row(stats, "A/B/SE", "aioli_mult")["moved_toward"]
    assert row(stats, "A/B/SE", "aioli_eta30x")["n_toward"] == 5


def test_probe_noise_per_arm(planted):
    _, _, stats = planted
    a, e = row(stats, "A/B/SE", "aioli"), row(stats, "A/B/SE", "aioli_evalall")
    assert a["beta_se"] == pytest.approx(3.0) and e["beta_se"] == pytest.approx(4.0)
    assert a["share_2se"] == 1.0
    assert math.isnan(row(stats, "A/B/SE", "stratified")["beta_se"])


def test_tidy_columns_and_rows(planted):
    _, _, stats = planted
    t = sens.tidy(stats)
    assert list(t.columns) == ["setting", "arm", "statistic", "seed", "value", "lo", "hi"]
    per_arm = len(sens._SCALARS) + 3 + 5 + 5  # statistics, final p per group, seeds × (ppl, Δ)
    assert len(t) == 2 * len(ARMS) * per_arm
    d = t[(t["setting"] == "A/B/SE") & (t["arm"] == "aioli")]
    one = d[d["statistic"] == "delta_vs_stratified"]
    assert one["seed"].isna().sum() == 1 and one["seed"].notna().sum() == 5
    top = one[one["seed"].isna()].iloc[0]
    assert top["value"] == pytest.approx(-0.5, abs=1e-9) and top["hi"] < 0
    assert one[one["seed"].notna()]["value"].mean() == pytest.approx(-0.5, abs=1e-9)
    assert d[d["statistic"] == "share_of_headroom"]["value"].item() == pytest.approx(0.4, abs=1e-9)


def test_hypotheses_from_planted(planted):
    _, _, stats = planted
    s1, s2, s3, s4, s5 = sens.hypotheses(stats)
    assert s1.startswith("S1") and ": holds" in s1  # t = 0.1 < 0.3 < 0.44 (seed mean) < 1.5
    assert (
        ": fails" in s2 and "better than stratified: aioli, aioli_eta3x" in s2 and "share > 0.5: none" in s2
    )
    assert ": undecided" in s3 and "aioli_rawA" in s3
    assert ": undecided" in s4 and "aioli_t2x" in s4  # no aioli_t2x run
    assert ": holds" in s5 and "1.33×" in s5  # 4 / 3 > 1.2


def test_s1_fails_when_out_of_order_and_s4_decided(tmp_path):
    arms = dict(ARMS)
    arms["aioli_eta30x"] = (0.0, [0.2] * 5, 0.01)  # below η 10×'s 0.44
    arms["aioli_t2x"] = (-0.5, [0.1] * 5, 0.01)  # ties aioli: same offset, centred noise
    ref = write_runs(tmp_path, arms)
    stats = sens.arm_stats(load_runs(tmp_path, "summary"), optimum(ref))
    s1, _, _, s4, _ = sens.hypotheses(stats)
    assert ": fails" in s1 and "not monotone" in s1
    assert ": holds" in s4 and "+0.000" in s4


def test_markdown_and_files(planted, tmp_path):
    frame, opt, stats = planted
    md = sens.markdown(stats, opt)
    assert (
        md.count("| arm |") == 2
        and all(x.count(" | ") == 9 for x in md.splitlines() if x.startswith("| "))
        and "p* (arxiv, book, stackexchange) = (0.500, 0.200, 0.300)" in md
    )
    line = next(x for x in md.splitlines() if x.startswith("| released (η 1×) |") and "better" in x)
    assert "-0.500 [" in line and "| 0.40 |" in line
    paths = sens.write_sensitivity(sens.arm_stats(frame, opt), opt, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"sensitivity.csv", "sensitivity.md", "sensitivity_p.png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    back = pd.read_csv(paths["csv"])
    assert len(back) == len(sens.tidy(stats)) and back["seed"].isna().any()
    text = paths["md"].read_text()
    assert all(f"- S{k} " in text for k in range(1, 6))
