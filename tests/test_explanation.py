"""The pre-registered decision rule of issue 25 applied to hand-made oracle and arm tables."""

from __future__ import annotations

import pandas as pd

from aioli_repro.results.explanation import explain, verdict_markdown


def _oracle(cos: tuple[float, float], agree: tuple[float, float]) -> pd.DataFrame:
    return pd.DataFrame({
        "setting": ["A/B/SE", "A/B/SE"], "t0": [84, 420],
        "mean_cos_oracle_opt": list(cos), "share_blocks_agree": list(agree),
    })  # fmt: skip


def _arms(moved: bool, verdict: str) -> pd.DataFrame:
    return pd.DataFrame({
        "setting": ["A/B/SE", "A/B/SE"], "arm": ["aioli_eta10x", "aioli_mult_eta10x"],
        "moved_toward": [moved, True], "d_strat_verdict": [verdict, "better"],
    })  # fmt: skip


def test_each_branch_of_the_rule() -> None:
    assert explain(_oracle((-0.4, -0.1), (0.9, 0.9)), _arms(True, "better"), "A/B/SE")[0] == (
        "the direction is wrong"
    )
    assert explain(_oracle((0.5, 0.3), (0.6, 0.9)), _arms(True, "better"), "A/B/SE")[0] == (
        "the estimate is too noisy"
    )
    assert explain(_oracle((0.5, 0.3), (0.8, 0.9)), _arms(True, "better"), "A/B/SE")[0] == (
        "the step is too small"
    )
    # oracle and blocks agree, but no larger-eta arm of the released rule wins (Alg. 1's does not count)
    assert explain(_oracle((0.5, 0.3), (0.8, 0.9)), _arms(True, "tie"), "A/B/SE")[0] == "mixed"
    assert explain(_oracle((0.5, -0.3), (0.8, 0.9)), _arms(True, "better"), "A/B/SE")[0] == "mixed"
    assert explain(_oracle((0.5, 0.3), (0.8, 0.9)), _arms(True, "better"), "CC/GH/W")[0] == "undecided"


def test_markdown_lists_every_setting_with_its_numbers() -> None:
    md = verdict_markdown(_oracle((0.5, 0.3), (0.6, 0.9)), _arms(False, "tie"), "footer")
    assert "| A/B/SE | the estimate is too noisy |" in md and "84: +0.50" in md and "420: 0.90" in md
