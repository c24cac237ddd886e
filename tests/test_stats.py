"""Paired intervals, verdicts and the headroom table on constructed numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aioli_repro.mixing.simplex import headroom_points, lattice_interior
from aioli_repro.results import headroom, stats, tables

SEEDS = range(5)


def _series(values) -> pd.Series:
    return pd.Series(list(values), index=list(range(len(values))), dtype=float)


def test_t_interval_matches_the_textbook_value() -> None:
    mean, lo, hi = stats.t_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    # sd = sqrt(2.5), t(0.975, 4) = 2.7764451, half = t * sd / sqrt(5) = 1.9632
    assert mean == 3.0 and hi - mean == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), abs=1e-6)
    assert mean - lo == pytest.approx(hi - mean)
    assert all(math.isnan(v) for v in stats.t_interval(np.array([1.0]))[1:])


def test_paired_uses_common_seeds_and_pairs_them() -> None:
    ref = _series([10.0, 11.0, 12.0, 13.0, 14.0])
    # a constant −0.2 on top of a large per-seed spread: unpaired it would be a tie, paired it is a win
    x = ref - 0.2 + _series([0.01, -0.01, 0.02, -0.02, 0.0])
    p = stats.paired(x, ref)
    assert p.n == 5 and p.mean == pytest.approx(-0.2) and p.hi < 0 and p.verdict == "better"
    assert stats.paired(x.iloc[:3], ref).n == 3  # only the seeds both have
    assert stats.paired(pd.Series([1.0], index=[7]), ref) is None


@pytest.mark.parametrize(
    "diffs, verdict",
    [
        ([-0.3, -0.2, -0.25, -0.35, -0.3], "better"),
        ([0.3, 0.2, 0.25, 0.35, 0.3], "worse"),
        ([-0.5, 0.4, -0.3, 0.2, 0.1], "tie"),  # negative mean, interval contains 0
        ([-0.9], "n<2"),
    ],
)
def test_verdict_needs_the_interval_to_exclude_zero(diffs: list[float], verdict: str) -> None:
    ref = _series(np.full(len(diffs), 20.0))
    p = stats.paired(ref + _series(diffs), ref)
    assert p.verdict == verdict
    text = stats.fmt_paired(p)
    assert text.startswith(f"{np.mean(diffs):+.3f}")
    assert text.endswith(verdict) == (verdict in ("better", "worse")) and ("[" in text) == (len(diffs) > 1)
    assert stats.tally(["better", "tie", "n<2", "worse", "better"]) == "2/2/1"


def _frame(cells: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    rows = [
        {"setting": s, "method": m, "seed": k, "scale": "mini", "data": "synthetic", "variant": None,
         "test_avg_ppl": v, "extra_runs": 0, "total_tokens": 1000}
        for (s, m), vals in cells.items() for k, v in enumerate(vals)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_table2_counts_only_interval_wins_and_shows_headroom_share() -> None:
    strat = [20.0, 21.0, 19.0, 20.5, 19.5]
    df = _frame({
        ("A/SE", "stratified"): strat,
        ("A/SE", "aioli"): [v - 0.5 + d for v, d in zip(strat, [0.05, -0.05, 0.0, 0.02, -0.02])],  # win
        ("A/SE", "aioli_null"): [v + d for v, d in zip(strat, [0.3, -0.3, 0.2, -0.2, 0.0])],  # tie
        ("GH/C4", "stratified"): strat,
        ("GH/C4", "aioli"): [v - 0.4 + d for v, d in zip(strat, [0.5, -0.6, 0.4, -0.5, 0.1])],  # tie (noisy)
        ("GH/C4", "grid"): [v + 0.3 for v in strat[:3]],  # loss, 3 seeds
    })  # fmt: skip
    no_headroom = [v - 0.01 * (k % 2) for k, v in enumerate(strat)]  # GH/C4: a tie, no headroom
    best = pd.DataFrame({"setting": ["A/SE"] * 5 + ["GH/C4"] * 5, "seed": list(SEEDS) * 2,
                         "test_avg_ppl": [v - 1.0 for v in strat] + no_headroom})  # fmt: skip
    table, md = tables.build_table2(df, "mini", "synthetic", headroom=best)
    assert table.loc["Aioli", tables.BEATING] == "1 (1/1/0)"
    assert table.loc["Aioli null (η = 0)", tables.BEATING] == "0 (0/1/0)"
    assert table.loc["GS", tables.BEATING] == "0 (0/0/1)" and table.loc["GS", tables.SEEDS] == "3"
    assert table.loc["Aioli", "A/SE"].endswith("better") and "better" not in table.loc["Aioli", "GH/C4"]
    assert table.loc["GS", "GH/C4"].startswith("+0.300 [+0.300, +0.300] worse")
    assert list(table.index)[:2] == ["Stratified", tables.HEADROOM]
    assert table.loc[tables.HEADROOM, "A/SE"].startswith("-1.000")
    # share: only A/SE has headroom beyond the noise; Aioli took half of it
    assert "**Share of the headroom captured**" in md
    share_line = [line for line in md.splitlines() if line.startswith("| Aioli |")][-1]
    assert share_line == "| Aioli | 0.50 |"


def test_headroom_points_and_best_static(tmp_path: Path) -> None:
    assert len(lattice_interior(3, 7)) == 15 and np.allclose(lattice_interior(3, 7).sum(1), 1)
    assert lattice_interior(3, 7).min() == pytest.approx(1 / 7)
    assert np.allclose(headroom_points(2)[:, 0], np.arange(1, 10) / 10)
    assert len(headroom_points(7)) >= 20 and np.allclose(headroom_points(7).sum(1), 1)
    # two points, three seeds: point 1 has the lower mean val and a test gain of exactly 0.5 per seed
    rows = []
    for seed in range(3):
        grid = [{"p": {"a": 0.1, "b": 0.9}, "val/avg_ppl": 12.0, "test/avg_ppl": 12.0 + seed},
                {"p": {"a": 0.6, "b": 0.4}, "val/avg_ppl": 9.0, "test/avg_ppl": 9.5 + seed}]  # fmt: skip
        path = tmp_path / f"h{seed}.json"
        path.write_text(json.dumps({"headroom_grid": grid}))
        rows.append({"setting": "A/SE", "method": "headroom", "seed": seed, "path": str(path)})
        rows.append(
            {
                "setting": "A/SE",
                "method": "stratified",
                "seed": seed,
                "path": "",
                "test_avg_ppl": 10.0 + seed,
                "val_avg_ppl": 10.0,
            }
        )
    frame = pd.DataFrame(rows)
    grid = headroom.load_grid(frame)
    # stratified joins as the uniform point -1: the best static mixture is never worse than it
    assert len(grid) == 9 and set(grid["p"]) == {"0.100 0.900", "0.600 0.400", "uniform"}
    best = headroom.best_static(grid)
    assert list(best["point"]) == [1, 1, 1] and list(best["test_avg_ppl"]) == [9.5, 10.5, 11.5]
    tab = headroom.headroom_table(grid, frame[frame["method"] == "stratified"], ["A/SE", "GH/C4"])
    row = tab.iloc[0]
    assert len(tab) == 1 and row["best static p"] == "0.600 0.400" and row["grid points"] == 2
    assert row["delta"] == pytest.approx(-0.5) and row["verdict"] == "better"
    pts = headroom.point_table(grid, frame[frame["method"] == "stratified"])
    assert list(pts["delta"]) == [pytest.approx(2.0), pytest.approx(-0.5), 0.0]
    # when no grid point beats uniform on val, uniform is the best static mixture: no headroom, Δ = 0
    worse = frame.copy()
    worse.loc[worse["method"] == "stratified", "val_avg_ppl"] = 8.0
    tab2 = headroom.headroom_table(
        headroom.load_grid(worse), worse[worse["method"] == "stratified"], ["A/SE"]
    )
    assert tab2.iloc[0]["best static p"] == "uniform" and tab2.iloc[0]["delta"] == 0.0


def test_claims_follow_the_preregistered_rule() -> None:
    from aioli_repro.results.claims import claims

    strat = [20.0, 21.0, 19.0, 20.5, 19.5]
    jitter = [0.02, -0.02, 0.01, -0.01, 0.0]
    cells_in = {("A/SE", "stratified"): strat, ("GH/C4", "stratified"): strat}
    # A/SE: Aioli wins by 0.5 and the null arm ties, so the gain is the adaptation's; GH/C4: a tie
    cells_in[("A/SE", "aioli")] = [v - 0.5 + d for v, d in zip(strat, jitter)]
    cells_in[("A/SE", "aioli_null")] = [v + d for v, d in zip(strat, jitter)]
    cells_in[("GH/C4", "aioli")] = [v + d for v, d in zip(strat, [0.3, -0.3, 0.2, -0.2, 0.0])]
    cells_in[("A/SE", "doge")] = [v + 0.4 for v in strat[:3]]  # DoGE loses somewhere: H3 holds for it
    cells_in[("A/SE", "grid")] = [v - 0.2 for v in strat[:3]]  # GS wins where it ran, GH/C4 missing
    df = _frame(cells_in)
    best = pd.DataFrame({"setting": ["A/SE"] * 5 + ["GH/C4"] * 5, "seed": list(SEEDS) * 2,
                         "test_avg_ppl": [v - 0.8 for v in strat] + [v + 0.001 for v in strat]})  # fmt: skip
    table, _ = tables.build_table2(df, "mini", "synthetic", headroom=best)
    status = claims(df, pd.DataFrame(table.attrs["cells"]))[0]["status"]
    assert status["H1 Aioli never loses to stratified"] == "holds"
    assert status["H2 Aioli wins where there is headroom"] == "holds"  # headroom only in A/SE, won there
    assert status["H3 DoGE is not consistently better than stratified"] == "holds"
    assert status["H3 GS is not consistently better than stratified"].startswith("undecided (1 of 2")
    assert status["H4 Aioli's wins come from the adaptation (Aioli − null < 0 where Aioli wins)"] == "holds"
    # a loss anywhere fails H1 at once, however many settings are missing
    df2 = _frame({**cells_in, ("GH/C4", "aioli"): [v + 0.5 for v in strat]})
    table2, _ = tables.build_table2(df2, "mini", "synthetic", headroom=best)
    status2 = claims(df2, pd.DataFrame(table2.attrs["cells"]))[0]["status"]
    assert status2["H1 Aioli never loses to stratified"] == "fails"


def test_table2_shows_the_refined_optimum_beside_the_grid_and_takes_its_share() -> None:
    strat = [20.0, 21.0, 19.0]
    df = _frame({
        ("A/SE", "stratified"): strat,
        ("A/SE", "aioli"): [v - 0.5 for v in strat],
        ("GH/C4", "stratified"): strat,
        ("GH/C4", "aioli"): [v - 0.5 for v in strat],
    })  # fmt: skip
    seeds = [0, 1, 2]
    grid = pd.DataFrame({"setting": ["A/SE"] * 3 + ["GH/C4"] * 3, "seed": seeds * 2,
                         "test_avg_ppl": [v - 1.0 for v in strat] * 2})  # fmt: skip
    # A/SE: the search found more (-2.0, with noise); GH/C4 has no refined row: the share keeps the grid's
    noisy = [v - 2.0 + d for v, d in zip(strat, [0.1, -0.1, 0.0])]
    refined = pd.DataFrame({"setting": ["A/SE"] * 3, "seed": seeds, "test_avg_ppl": noisy})
    table, md = tables.build_table2(df, "mini", "synthetic", headroom=grid, refined=refined)
    assert list(table.index)[:3] == ["Stratified", tables.HEADROOM, tables.REFINED]
    assert (
        table.loc[tables.REFINED, "A/SE"].startswith("-2.000 [") and table.loc[tables.REFINED, "GH/C4"] == "—"
    )
    share_line = [line for line in md.splitlines() if line.startswith("| Aioli |")][-1]
    assert share_line == "| Aioli | 0.25 | 0.50 |"  # A/SE: 0.5 of the refined 2.0; GH/C4: of the grid's 1.0


def test_post_table_has_the_later_methods_and_their_headroom_share() -> None:
    """`reproduce post`: stratified, the best static rows and the later methods (in POST_LABELS order), with
    Table 2's paired cells and the headroom share; a method absent from the runs is a row of dashes."""
    strat = [20.0, 21.0, 19.0]
    df = _frame({
        ("A/SE", "stratified"): strat,
        ("A/SE", "regmix"): [v - 0.5 for v in strat],
        ("A/SE", "unimax"): strat,
        ("A/SE", "aioli"): [v - 9.0 for v in strat],  # a Table 2 row: not in this table
    })  # fmt: skip
    refined = pd.DataFrame(
        {"setting": ["A/SE"] * 3, "seed": [0, 1, 2], "test_avg_ppl": [v - 2.0 for v in strat]}
    )
    table, md = tables.build_table2(df, "mini", "synthetic", refined=refined, post=True)
    assert list(table.index) == ["Stratified", tables.REFINED, *tables.POST_LABELS.values()]
    assert table.loc["RegMix", "A/SE"].startswith("-0.500 [") and table.loc["UniMax", "A/SE"].startswith(
        "+0.000"
    )
    assert table.loc["ADO", "A/SE"] == "—" and "Aioli" not in table.index
    share_line = [line for line in md.splitlines() if line.startswith("| RegMix |")][-1]
    assert share_line == "| RegMix | 0.25 |"  # 0.5 of the refined optimum's 2.0
    assert "| UniMax | 0.00 |" in md  # no change is 0.00, not -0.00
