"""The oracle check of Aioli's estimator (docs/miniature.md, "3. An oracle check of the estimator").

For each (setting, t₀, seed) two runs train identically through one LearnParams round of k = 32 sweeps:
`oracle_full_t<t0>` evaluates its probes on the whole val split (the **oracle**: A from the mean of all 32
sweeps) and `oracle_cap_t<t0>` on the miniature's 128-sequence cap, whose disjoint 4-sweep blocks are
miniature-budget estimates (the released k = 4). Each block's A is compared with the oracle's, and both
implied mixtures (the released rule, one round from uniform) with the static optimum p*.

Only `method_history[0]` matters: the runs make one round, and after it their p (and so their training)
differ by design.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aioli_repro.fileio import atomic_write
from aioli_repro.mixing.learn_params import normalize_A, solve_A
from aioli_repro.mixing.simplex import softmax
from aioli_repro.results.tables import SETTINGS, TIDY_COLUMNS, to_markdown

# `oracle_full_t84` -> ("full", 84)
ORACLE_METHOD = re.compile(r"^oracle_(full|cap)_t(\d+)$")
KEY = ["setting", "t0", "seed"]
ROW_COLUMNS = [
    *KEY, "block", "sweeps", "r", "sign_agree", "p_l1", "cos_oracle", "cos_opt", "cos_oracle_opt",
    "train_equal", "train_max_rel_diff", "train_check",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "setting", "t0", "seeds", "blocks", "median_r", "median_sign_agree", "median_p_l1", "share_blocks_agree",
    "mean_cos_oracle_opt", "seeds_oracle_toward_opt", "median_cos_opt", "train_equal",
]  # fmt: skip
# below this norm a vector has no direction (p ≈ u): its cosine is undefined
_TINY = 1e-12


# -- the estimator's pieces ------------------------------------------------------------------------------
def implied_p(A_raw: np.ndarray, eta: float) -> np.ndarray:
    """The released update one round from uniform, no EMA: p = softmax(η Σ_i normalize_A(A)_ij)."""
    # From uniform the log-weights start equal, so the round's p depends on this A alone.
    grad = normalize_A(A_raw).sum(axis=0)
    return softmax(float(eta) * grad)


def block_betas(G: np.ndarray, block: int) -> list[np.ndarray]:
    """β of each disjoint run of `block` consecutive sweeps of G (k, m, m); a remainder is dropped."""
    if block < 1:
        raise ValueError(f"block_betas: block must be >= 1, got {block}")
    G = np.asarray(G, dtype=np.float64)
    # consecutive sweeps: a block is what a run with k = block would have measured in that window
    return [G[b * block : (b + 1) * block].mean(axis=0) for b in range(G.shape[0] // block)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors; nan when either has (almost) no length, i.e. no direction."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < _TINY or nb < _TINY:
        return math.nan
    return float(np.dot(a, b) / (na * nb))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two flattened arrays; nan when either is constant (r is undefined)."""
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def compare_block(
    A_block: np.ndarray, A_oracle: np.ndarray, eta: float, p_star: np.ndarray | None
) -> dict[str, float]:
    """One block's raw A against the oracle's: entry agreement, and where the implied p's point.

    r, sign_agree: over the m² entries of the raw A's. p_l1: L1 between the implied p's. cos_oracle:
    cos(p_block − u, p_oracle − u). cos_opt: cos(p_block − u, p* − u) (nan without p*).
    """
    A_block, A_oracle = np.asarray(A_block, np.float64), np.asarray(A_oracle, np.float64)
    p_block, p_oracle = implied_p(A_block, eta), implied_p(A_oracle, eta)
    u = np.full(len(p_block), 1.0 / len(p_block))
    return {
        "r": _pearson(A_block, A_oracle),
        "sign_agree": float(np.mean(np.sign(A_block) == np.sign(A_oracle))),
        "p_l1": float(np.abs(p_block - p_oracle).sum()),
        # directions relative to u: the update's only effect from uniform is where it moves p
        "cos_oracle": _cos(p_block - u, p_oracle - u),
        "cos_opt": math.nan if p_star is None else _cos(p_block - u, np.asarray(p_star, np.float64) - u),
    }


# -- reading the runs ------------------------------------------------------------------------------------
def _first_round(summary: dict) -> dict:
    """method_history[0]: the check's only round."""
    history = summary.get("method_history") or []
    if not history:
        raise ValueError(f"oracle: run {summary.get('method')} seed {summary.get('seed')} made no round")
    return history[0]


def _oracle_A(round0: dict) -> np.ndarray:
    """The full run's A from the mean of all its sweeps (beta is that mean; G when recorded)."""
    G = round0.get("G")
    beta = np.asarray(G, np.float64).mean(axis=0) if G is not None else np.asarray(round0["beta"], np.float64)
    return solve_A(beta, np.asarray(round0["P"], np.float64))


def _block_As(round0: dict, block: int) -> list[np.ndarray]:
    """The cap run's miniature-budget A's, each solved with that run's own realised probe mixtures."""
    if round0.get("G") is None:
        raise ValueError("oracle: the cap run's method_history has no per-sweep G (a summary from before G)")
    P = np.asarray(round0["P"], np.float64)
    return [solve_A(b, P) for b in block_betas(np.asarray(round0["G"], np.float64), block)]


def _metrics_files(summary: dict, summary_path: Path) -> list[Path]:
    """Where the run's metrics.jsonl may be: the recorded run dirs, or the same names next to this summary
    (results copied to another machine keep their layout but not their absolute paths)."""
    dirs = [Path(d) for d in (summary.get("final_run_dir"), summary.get("run_dir")) if d]
    dirs += [summary_path.parent.parent / d.name for d in dirs] + [summary_path.parent]
    return [d / "metrics.jsonl" for d in dirs]


def _train_losses(summary: dict, summary_path: Path, upto: int) -> dict[int, float] | None:
    """train/loss per logged step <= upto from the run's metrics.jsonl; None when no file is found."""
    for f in _metrics_files(summary, summary_path):
        if f.is_file():
            rows = (json.loads(line) for line in f.read_text().splitlines() if line.strip())
            return {
                int(r["step"]): float(r["train/loss"])
                for r in rows
                if "train/loss" in r and r.get("step") is not None and int(r["step"]) <= upto
            }
    return None


def _pre_update_record(summary: dict) -> dict[str, tuple[list[int], np.ndarray]]:
    """What the summary itself holds about training up to the round's update step u: (steps, values) each.

    P: the realised probe mixtures (counts of the sequences actually drawn, so equal only if the same
    batches were drawn). trajectory: the sampled p before u (at u it holds each run's own new p).
    val_history: the periodic whole-split val losses at steps <= u (the same model gives the same losses).
    """
    round0 = _first_round(summary)
    u = int(round0["step"])
    traj = [r for r in summary.get("trajectory") or [] if int(r["step"]) < u]
    val = [(int(s), v) for s, v in summary.get("val_history") or [] if int(s) <= u]
    return {
        "P": ([0], np.asarray(round0["P"], np.float64)),
        "trajectory": (
            [int(r["step"]) for r in traj],
            np.asarray([[*r["p"].values(), float(r["probe"])] for r in traj], np.float64),
        ),
        "val_history": ([s for s, _ in val], np.asarray([v for _, v in val], np.float64)),
    }


def _max_rel_diff(a: tuple[list[int], np.ndarray], b: tuple[list[int], np.ndarray]) -> float:
    """Largest relative difference of two (steps, values) records; inf when their steps or shapes differ."""
    (sa, va), (sb, vb) = a, b
    if sa != sb or va.shape != vb.shape:
        return math.inf
    if va.size == 0:
        return 0.0
    scale = np.maximum(np.maximum(np.abs(va), np.abs(vb)), _TINY)
    return float((np.abs(va - vb) / scale).max())


def train_match(
    full: dict, cap: dict, full_path: Path, cap_path: Path, rtol: float = 1e-6
) -> tuple[bool, float, str]:
    """Did the two runs train identically up to the round's update? (equal, max relative difference, what
    was compared).

    Final train losses cannot be compared: the runs' p differ after the round by design. So we compare
    everything fixed before the update: the train/loss of each logged window ending at or before it (from
    metrics.jsonl, when both runs' files are found) and the summary's pre-update record (realised probe
    mixtures P, sampled-p trajectory, periodic val losses). `rtol` allows float noise of GPU kernels only.
    """
    a, b = _pre_update_record(full), _pre_update_record(cap)
    u = int(_first_round(full)["step"])
    la, lb = _train_losses(full, full_path, u), _train_losses(cap, cap_path, u)
    check = "summary"
    if la is not None and lb is not None:
        a["train_loss"] = (sorted(la), np.asarray([la[s] for s in sorted(la)]))
        b["train_loss"] = (sorted(lb), np.asarray([lb[s] for s in sorted(lb)]))
        check = "train_loss+summary"
    if int(_first_round(cap)["step"]) != u:
        return False, math.inf, check
    diff = max(_max_rel_diff(a[k], b[k]) for k in a)
    return diff <= rtol, diff, check


def _oracle_runs(frame: pd.DataFrame) -> dict[tuple[str, int, int], dict[str, Path]]:
    """{(setting, t0, seed): {"full": path, "cap": path}} of the oracle runs in a `load_runs` frame."""
    runs: dict[tuple[str, int, int], dict[str, Path]] = {}
    for r in frame.itertuples(index=False):
        m = ORACLE_METHOD.match(str(r.method))
        if m is None:
            continue
        kind, t0 = m.group(1), int(m.group(2))
        slot = runs.setdefault((str(r.setting), t0, int(r.seed)), {})
        if kind in slot:  # the frame is sorted by run_key: keep the last, but say so
            warnings.warn(
                f"oracle: two {r.method} runs for {r.setting} seed {r.seed}; using {r.path}", stacklevel=2
            )
        slot[kind] = Path(str(r.path))
    return runs


def _missing(pair: dict[str, Path]) -> str:
    return "cap" if "full" in pair else "full"


def _setting_order(setting: str) -> int:
    return SETTINGS.index(setting) if setting in SETTINGS else len(SETTINGS)


# -- the tables ------------------------------------------------------------------------------------------
def oracle_rows(
    frame: pd.DataFrame,
    p_star: dict[str, np.ndarray],
    eta: dict[str, float],
    block: int = 4,
    rtol: float = 1e-6,
) -> pd.DataFrame:
    """One row per (setting, t0, seed, block): the block's metrics against the oracle (`compare_block`),
    the oracle's own cos(p_oracle − u, p* − u), and whether the pair trained identically.

    `p_star[setting]` is in the runs' group order (nan cosines where a setting has none); `eta[setting]` is
    the released η. A run without its full/cap partner is skipped with a warning.
    """
    rows = []
    for (setting, t0, seed), pair in sorted(
        _oracle_runs(frame).items(), key=lambda kv: (_setting_order(kv[0][0]), kv[0])
    ):
        if set(pair) != {"full", "cap"}:
            warnings.warn(
                f"oracle: {setting} t0={t0} seed {seed} has no {_missing(pair)} run; skipped",
                stacklevel=2,
            )
            continue
        full, cap = (json.loads(pair[k].read_text()) for k in ("full", "cap"))
        A_oracle = _oracle_A(_first_round(full))
        ps = p_star.get(setting)
        ps = None if ps is None else np.asarray(ps, np.float64)
        p_oracle = implied_p(A_oracle, eta[setting])
        u = np.full(len(p_oracle), 1.0 / len(p_oracle))
        cos_oracle_opt = math.nan if ps is None else _cos(p_oracle - u, ps - u)
        equal, diff, check = train_match(full, cap, pair["full"], pair["cap"], rtol)
        for b, A_block in enumerate(_block_As(_first_round(cap), block)):
            rows.append({
                "setting": setting, "t0": t0, "seed": seed, "block": b, "sweeps": block,
                **compare_block(A_block, A_oracle, eta[setting], ps),
                "cos_oracle_opt": cos_oracle_opt,
                "train_equal": equal, "train_max_rel_diff": diff, "train_check": check,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def oracle_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, t0): the blocks' agreement with the oracle, and the oracle's and blocks' with p*."""
    out = []
    for (setting, t0), d in rows.groupby(["setting", "t0"], sort=False):
        per_seed = d.drop_duplicates("seed")  # cos_oracle_opt and train_equal are per (setting, t0, seed)
        out.append({
            "setting": setting, "t0": int(t0), "seeds": int(per_seed.shape[0]), "blocks": int(d.shape[0]),
            "median_r": float(d["r"].median()),
            "median_sign_agree": float(d["sign_agree"].median()),
            "median_p_l1": float(d["p_l1"].median()),
            # a block without a direction (nan cosine) does not agree: the denominator is every block
            "share_blocks_agree": float((d["cos_oracle"] > 0).mean()),
            "mean_cos_oracle_opt": float(per_seed["cos_oracle_opt"].mean()),
            "seeds_oracle_toward_opt": int((per_seed["cos_oracle_opt"] > 0).sum()),
            "median_cos_opt": float(d["cos_opt"].median()),
            "train_equal": bool(per_seed["train_equal"].all()),
        })  # fmt: skip
    tab = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    key = tab["setting"].map(_setting_order)
    return (
        tab.assign(_k=key).sort_values(["_k", "t0"], kind="stable").drop(columns="_k").reset_index(drop=True)
    )


def tidy(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary in long form (setting, arm, statistic, seed, value, lo, hi); no intervals here."""
    stats = [c for c in summary.columns if c not in ("setting", "t0")]
    rows = [
        {
            "setting": r["setting"], "arm": f"oracle t0={int(r['t0'])}", "statistic": s,
            "seed": "", "value": float(r[s]), "lo": math.nan, "hi": math.nan,
        }
        for _, r in summary.iterrows()
        for s in stats
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def direction_verdict(summary: pd.DataFrame, setting: str) -> dict[str, Any]:
    """The two facts the pre-registered decision rule needs for one setting, each over every t0 present.

    oracle_toward_opt: mean cos(p_oracle − u, p* − u) > 0 at every t0. blocks_agree: at least 75% of the
    miniature-budget blocks point the oracle's way (cos_oracle > 0) at every t0. No rows: both False
    (an absent check is no evidence); `t0s` says which starts were there.
    """
    d = summary[summary["setting"] == setting]
    present = not d.empty
    return {
        "setting": setting,
        "t0s": sorted(int(t) for t in d["t0"]),
        # nan > 0 and nan >= 0.75 are False: an undefined direction never counts as agreement
        "oracle_toward_opt": present and bool((d["mean_cos_oracle_opt"] > 0).all()),
        "blocks_agree": present and bool((d["share_blocks_agree"] >= 0.75).all()),
    }


# -- output ----------------------------------------------------------------------------------------------
COLUMN_NOTES = {
    "seeds": "pairs of runs (full, cap) found for this setting and t₀.",
    "blocks": "miniature-budget estimates: disjoint blocks of consecutive sweeps of the cap runs (8 per run "
    "at k = 32, 4 sweeps each).",
    "median_r": "median over blocks of the Pearson correlation between the block's raw A and the oracle's "
    "(all m² entries); nan blocks (a constant A) are left out.",
    "median_sign_agree": "median over blocks of the share of A's entries whose sign equals the oracle's.",
    "median_p_l1": "median over blocks of the L1 distance between the block's implied p and the oracle's "
    "(the released rule, one round from uniform, released η, normalised A, no EMA).",
    "share_blocks_agree": "share of blocks whose implied move from uniform points the oracle's way, "
    "cos(p_block − u, p_oracle − u) > 0; a block with no direction counts as disagreeing.",
    "mean_cos_oracle_opt": "mean over seeds of cos(p_oracle − u, p* − u): does a low-noise A point at the "
    "static optimum p*?",
    "seeds_oracle_toward_opt": "seeds whose oracle points toward p* (that cosine > 0).",
    "median_cos_opt": "median over blocks of cos(p_block − u, p* − u).",
    "train_equal": "whether every pair trained identically up to the round's update (train losses of the "
    "logged windows, realised probe mixtures, sampled p, periodic val losses).",
}


def _cell(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def oracle_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table, followed by what each column means."""
    shown = summary.copy()
    shown.insert(0, "arm", [f"{s} t0={t}" for s, t in zip(shown.pop("setting"), shown.pop("t0"))])
    shown = shown.set_index("arm").apply(lambda c: c.map(_cell))  # Series.map: any pandas >= 2.0
    notes = "\n".join(f"- **{c}**: {t}" for c, t in COLUMN_NOTES.items())
    return (
        "**Oracle check of Aioli's estimator** (one LearnParams round of k = 32 sweeps; oracle: probes "
        "evaluated on the whole val split; blocks: 4-sweep estimates on the 128-sequence cap)\n\n"
        f"{to_markdown(shown, 'Setting, t0')}\n\n{notes}\n\n"
        "The model trains during the 96 probe steps, so A drifts inside the window: a limit of the check.\n"
    )


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_oracle(rows: pd.DataFrame, summary: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """oracle.csv (the tidy summary), oracle_blocks.csv (the per-block rows) and oracle.md, atomically."""
    out = Path(out_dir)
    paths = {"csv": out / "oracle.csv", "blocks_csv": out / "oracle_blocks.csv", "md": out / "oracle.md"}
    _write_text(paths["csv"], tidy(summary).to_csv(index=False))
    _write_text(paths["blocks_csv"], rows.to_csv(index=False))
    _write_text(paths["md"], oracle_markdown(summary))
    return paths
