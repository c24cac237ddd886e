"""The pre-registered decision (issue 25, docs/miniature.md): per setting, which explanation of Aioli's
ties the oracle check and the sensitivity arms support: the direction is wrong, the estimate is too noisy,
the step is too small, or mixed. The rule is applied as written; this module only reads the two tables.
"""

from __future__ import annotations

import pandas as pd

from aioli_repro.results.oracle import direction_verdict

AGREE = 0.75  # share of miniature-budget blocks whose direction must agree with the oracle's
LARGER_ETA = ("aioli_eta3x", "aioli_eta10x", "aioli_eta30x")  # the released rule's larger steps


def explain(oracle_summary: pd.DataFrame, arm_stats: pd.DataFrame, setting: str) -> tuple[str, str]:
    """(verdict, the numbers behind it) for one setting (its row label, e.g. "A/B/SE")."""
    o = oracle_summary[oracle_summary["setting"] == setting]
    if o.empty:
        return "undecided", "no oracle runs"
    cos = {int(r.t0): float(r.mean_cos_oracle_opt) for r in o.itertuples()}
    agree = {int(r.t0): float(r.share_blocks_agree) for r in o.itertuples()}
    facts = direction_verdict(oracle_summary, setting)
    arms = arm_stats[(arm_stats["setting"] == setting) & arm_stats["arm"].isin(LARGER_ETA)]
    winners = [r.arm for r in arms.itertuples() if r.moved_toward and r.d_strat_verdict == "better"]
    why = (
        "mean cos(p_oracle − u, p* − u) by t0: " + ", ".join(f"{t}: {c:+.2f}" for t, c in cos.items())
        + "; share of 4-sweep blocks agreeing with the oracle's direction: "
        + ", ".join(f"{t}: {a:.2f}" for t, a in agree.items())
        + f"; larger-η arms toward p* and better than stratified: {', '.join(winners) or 'none'}"
    )  # fmt: skip
    if any(pd.isna(c) for c in cos.values()):
        return "undecided", why
    if all(c <= 0 for c in cos.values()):
        return "the direction is wrong", why
    if facts["oracle_toward_opt"]:
        if not facts["blocks_agree"]:
            return "the estimate is too noisy", why
        if winners:
            return "the step is too small", why
    return "mixed", why


def verdict_markdown(oracle_summary: pd.DataFrame, arm_stats: pd.DataFrame, footer: str) -> str:
    """A short file: the decision per setting with its numbers."""
    lines = [
        "**Why Aioli ties: the pre-registered decision per setting** (rule: docs/miniature.md, issue 25)",
        "",
        "| Setting | verdict | the numbers |",
        "|---|---|---|",
    ]
    settings = list(dict.fromkeys([*oracle_summary.get("setting", []), *arm_stats.get("setting", [])]))
    for s in settings:
        verdict, why = explain(oracle_summary, arm_stats, s)
        lines.append(f"| {s} | {verdict} | {why} |")
    return "\n".join([*lines, "", footer])
