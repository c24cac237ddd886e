"""`reproduce post`'s mixture table: each later method's p against the token prior, p* and uniform."""

from __future__ import annotations

import pandas as pd
import pytest

from aioli_repro.results import post_mixtures as pm
from aioli_repro.results.tables import REFINED


def _run(method: str, seed: int, learned: dict | None, final: dict) -> dict:
    return {"setting": "A/B/SE", "method": method, "seed": seed, "learned_proportions": learned,
            "proportions": final}  # fmt: skip


def test_distances_to_prior_optimum_and_uniform_with_known_answers():
    third = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    df = pd.DataFrame([
        _run("regmix", 0, {"a": 0.5, "b": 0.3, "c": 0.2}, third),  # offline: the learned p counts
        _run("regmix", 1, {"a": 0.7, "b": 0.1, "c": 0.2}, third),
        _run("ado", 0, None, {"a": 0.6, "b": 0.2, "c": 0.2}),  # online: the final p
        _run("aioli", 0, None, third),  # a Table 2 method: not in this table
    ])  # fmt: skip
    prior = {"a": 0.6, "b": 0.2, "c": 0.2}
    tidy = pm.mixture_distances(df, {"A/B/SE": prior}, {"A/B/SE": {"a": 0.2, "b": 0.4, "c": 0.4}})

    def value(arm: str, stat: str, seed=None) -> float:
        t = tidy[(tidy["arm"] == arm) & (tidy["statistic"] == stat)]
        t = t[t["seed"].isna()] if seed is None else t[t["seed"] == seed]
        assert len(t) == 1, (arm, stat, seed)
        return float(t["value"].iloc[0])

    assert value("RegMix", "l1_prior", 0) == pytest.approx(0.2) and value(
        "RegMix", "l1_prior", 1
    ) == pytest.approx(0.2)
    assert value("RegMix", "l1_optimum") == pytest.approx((0.6 + 1.0) / 2)
    assert value("RegMix", "l1_uniform", 0) == pytest.approx(1 / 6 + 1 / 30 + 2 / 15)
    assert value("RegMix", "p/a") == pytest.approx(0.6)
    assert value("ADO", "l1_prior") == pytest.approx(0.0) and value("ADO", "l1_optimum") == pytest.approx(0.8)
    assert value(REFINED, "p/b") == 0.4 and value(pm.PRIOR, "p/a") == 0.6
    assert "Aioli" not in set(tidy["arm"])
    assert list(tidy.columns) == ["setting", "arm", "statistic", "seed", "value", "lo", "hi"]
    md = pm.mixtures_markdown(tidy)
    assert "| A/B/SE | RegMix | 0.600 / 0.200 / 0.200 | 0.200 | 0.800 | 0.533 |" in md
    assert "| A/B/SE | Token prior | 0.600 / 0.200 / 0.200 | — | — | — |" in md


def test_refined_optima_read_from_the_study_csv():
    csv = pd.DataFrame({
        "setting": ["CC/GH/W"] * 4, "arm": [REFINED, REFINED, REFINED, "Best static (grid)"],
        "statistic": ["p/cc", "p/gh", "test_avg_ppl", "p/cc"], "value": [0.7, 0.3, 30.0, 0.5],
    })  # fmt: skip
    assert pm.refined_optima(csv) == {"CC/GH/W": {"cc": 0.7, "gh": 0.3}}
