"""The paper's claims (docs/miniature.md, H1-H5), decided from a built Table 2 by the pre-registered rule.

A claim about a setting is decided only where the cells it needs exist; otherwise it is "undecided".
"""

from __future__ import annotations

import pandas as pd

from aioli_repro.results.stats import fmt_paired, paired
from aioli_repro.results.tables import BASELINES, METHOD_LABELS, SETTINGS, by_seed, to_markdown


def _verdicts(cells: pd.DataFrame, method: str) -> dict[str, str]:
    mine = cells[(cells["method"] == method) & (cells["kind"] == "delta")]
    return dict(zip(mine["setting"], mine["verdict"]))


def _runs(df: pd.DataFrame, setting: str, method: str) -> pd.Series:
    return by_seed(df[(df["setting"] == setting) & (df["method"] == method)])


def _head_to_head(df: pd.DataFrame, a: str, b: str) -> dict[str, object]:
    """Per setting: the paired difference a − b (None where either is missing)."""
    return {s: paired(_runs(df, s, a), _runs(df, s, b)) for s in SETTINGS}


def _status(ok: bool, decided: int, total: int) -> str:
    if decided < total:
        return f"{'fails' if not ok else 'undecided'} ({decided} of {total} settings decided)"
    return "holds" if ok else "fails"


def claims(df: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per hypothesis: claim, status, evidence; per-setting head-to-head differences)."""
    present = [s for s in SETTINGS if ((cells["setting"] == s) & (cells["method"] == "stratified")).any()]
    aioli = _verdicts(cells, "aioli")
    head = _verdicts(cells, "headroom")
    rows = []
    lost = [s for s, v in aioli.items() if v == "worse"]
    rows.append(
        (
            "H1 Aioli never loses to stratified",
            _status(not lost, len(aioli), len(present)),
            f"worse in {lost or 'none'}; decided in {sorted(aioli, key=SETTINGS.index)}",
        )
    )
    room = [s for s in present if head.get(s) == "better"]
    missed = [s for s in room if aioli.get(s) != "better" and s in aioli]
    decided = sum(s in aioli for s in room)
    rows.append(
        (
            "H2 Aioli wins where there is headroom",
            _status(not missed, decided, len(room)),
            f"headroom in {room or 'no setting'}; Aioli not better in {missed or 'none'}",
        )
    )
    for m in BASELINES:
        v = _verdicts(cells, m)
        worse = [s for s, x in v.items() if x == "worse"]
        not_better = [s for s, x in v.items() if x != "better"]
        # a loss anywhere decides it; without one, every setting must have been run
        strong = "holds" if worse else _status(False, len(v), len(present)).replace("fails (", "undecided (")
        evidence = f"worse in {worse or 'none'}; not better (weak reading) in {not_better or 'none'}"
        rows.append((f"H3 {METHOD_LABELS[m]} is not consistently better than stratified", strong, evidence))
    gain = _head_to_head(df, "aioli", "aioli_null")
    wins = [s for s, x in aioli.items() if x == "better"]
    unexplained = [s for s in wins if gain[s] is None or gain[s].verdict != "better"]
    rows.append(("H4 Aioli's wins come from the adaptation (Aioli − null < 0 where Aioli wins)",
                 ("holds" if not unexplained else "fails") if wins else "not applicable (Aioli wins nowhere)",
                 f"Aioli wins in {wins or 'none'}; "
                 f"Aioli − null not below 0 in {unexplained or 'none'}"))  # fmt: skip
    rule = _head_to_head(df, "aioli_mult", "aioli")
    diff = [s for s, p in rule.items() if p is not None and p.verdict in ("better", "worse")]
    rows.append(("H5 Alg. 1 and the released rule differ", f"differ in {len(diff)} setting(s)",
                 f"{diff or 'none'}"))  # fmt: skip
    table = pd.DataFrame(rows, columns=["claim", "status", "evidence"]).set_index("claim")
    pairs = pd.DataFrame(
        {"Aioli − Aioli null": {s: fmt_paired(p) for s, p in gain.items() if p is not None},
         "Aioli (Alg. 1) − Aioli": {s: fmt_paired(p) for s, p in rule.items() if p is not None}}
    ).T  # fmt: skip
    return table, pairs


def claims_markdown(df: pd.DataFrame, cells: pd.DataFrame) -> str:
    table, pairs = claims(df, cells)
    out = "**The paper's claims at this scale** (docs/miniature.md, decided by its pre-registered rule)\n\n"
    out += to_markdown(table, "Claim") + "\n"
    if not pairs.empty:
        out += (
            "\n**Head to head** (paired by seed, 95% t-interval)\n\n"
            + to_markdown(pairs, "Difference")
            + "\n"
        )
    return out
