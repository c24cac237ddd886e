"""One run's mixture over training: the proportions it trained on, with the probe mixtures apart.

Aioli's LearnParams steps train briefly on probe mixtures (close to one group each); drawn as part of
the line they hide the mixture the method actually chose, so they are drawn as faint dots instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aioli_repro.training.callbacks import trajectory_records


def step_curve(records: list[dict], groups: list[str], end: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, proportions) of the trained (non-probe) mixture as a step function up to `end`."""
    trained = [r for r in records if not r["probe"]]
    if not trained:
        return np.zeros(0), np.zeros((0, len(groups)))
    steps = [r["step"] for r in trained] + [max(end, trained[-1]["step"])]
    p = [[r["p"].get(g, np.nan) for g in groups] for r in trained]
    return np.asarray(steps, dtype=float), np.asarray(p + [p[-1]], dtype=float)


def plot_trajectory(summary: dict, out_path: str | Path, title: str | None = None) -> Path:
    """A PNG of `summary`'s mixture trajectory: one line per group (full names), probes as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(summary["groups"])
    records = trajectory_records(summary)
    end = int(summary.get("steps") or (records[-1]["step"] if records else 0))
    steps, p = step_curve(records, groups, end)
    fig = Figure(figsize=(7.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, g in enumerate(groups):
        line = ax.step(steps, p[:, j], where="post", label=g) if len(steps) else ax.plot([], [], label=g)
        probes = [(r["step"], r["p"].get(g, np.nan)) for r in records if r["probe"]]
        if probes:
            xs, ys = zip(*probes)
            ax.scatter(xs, ys, s=6, alpha=0.25, color=line[0].get_color(), linewidths=0)
    ax.set_xlim(0, max(end, 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("proportion")
    n_probe = sum(r["probe"] for r in records)
    note = f" (dots: {n_probe} probe steps)" if n_probe else ""
    ax.set_title(
        title or f"{summary['method']} on {summary['setting']}, seed {summary['seed']}{note}", fontsize=9
    )
    ax.legend(fontsize=8, loc="upper right", ncols=min(len(groups), 4))
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
