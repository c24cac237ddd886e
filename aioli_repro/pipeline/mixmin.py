"""MixMin as a pipeline: m one-hot proxy runs -> their log-probabilities on the target -> the convex
problem (mixing/mixmin.py) -> one static run on its solution.

The target is our validation split, every group weighted equally whatever its size (the paper's average
loss over groups). As in the released LLM code, a unit of the target is a whole sequence by default: the
mixture is one of the proxies' distributions over sequences, and each sequence's log-probability is
divided by its length (`logprob_unit: token` mixes the next-token distributions instead). Proxies are
the run's recipe at `proxy_steps` steps, warm-up the same share of their steps as the run's, and no
periodic validation; their final weights are kept (`recipes._weights_loaded_later`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from aioli_repro.mixing.mixmin import LR, MAX_STEPS, TOL, solve_mixmin, unit_weights
from aioli_repro.model import build_model, lm_token_losses, load_decoder_state
from aioli_repro.pipeline.recipes import Learned, Pipeline, _named, derive, static_mixer
from aioli_repro.pipeline.stage import Stage
from aioli_repro.training.preflight import build_data

PROXY_LABEL = "mixmin_proxy"  # the stages' method label: recipes._weights_loaded_later keeps their weights


def proxy_stage(cfg: DictConfig, k: int, steps: int) -> Stage:
    """Proxy k: a static one-hot run on group k for `steps` steps."""
    m = len(cfg.groups.names)
    warmup = int(round(int(cfg.train.warmup_steps) * steps / int(cfg.train.max_steps)))
    # val_every 0: no periodic validation (the recipe scores the proxy itself)
    proxy_cfg = derive(
        cfg, PROXY_LABEL, static_mixer(np.eye(m)[k]), max_steps=steps, warmup_steps=warmup, val_every=0
    )
    return Stage(f"{PROXY_LABEL}{k}", proxy_cfg)


def target_sequences(cfg: DictConfig, max_seqs: int | None) -> list[np.ndarray]:
    """Each group's first `max_seqs` validation sequences (all when None), as (n_g, T) arrays."""
    _, packed = build_data(cfg)
    return [np.asarray(packed.val[g][: max_seqs or len(packed.val[g])]) for g in cfg.groups.names]


@torch.inference_mode()
def token_log_probs(
    ckpt: str | Path, cfg: DictConfig, seqs: list[np.ndarray], device: torch.device
) -> list[np.ndarray]:
    """Per group, the (n_g, T-1) next-token log-probabilities of a checkpoint's decoder (eval mode, batched,
    fp32)."""
    with torch.random.fork_rng(devices=[]):  # the throw-away init draws no number from the pipeline's stream
        model = build_model(cfg.model)
    model.load_state_dict(load_decoder_state(ckpt))
    model.to(device).eval()
    bs = int(cfg.train.eval_batch_size)
    out = []
    for arr in seqs:
        parts = [
            -lm_token_losses(model, torch.from_numpy(arr[i : i + bs].astype(np.int64)).to(device))
            for i in range(0, len(arr), bs)
        ]
        out.append(torch.cat(parts).double().cpu().numpy())
    return out


def target_matrix(per_proxy: list[list[np.ndarray]], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) log-probabilities of the target units and their weights u (equal per group)."""
    rows = []
    for groups in per_proxy:
        if unit == "sequence":
            rows.append(np.concatenate([g.sum(axis=1) for g in groups]))
        else:
            rows.append(np.concatenate([g.ravel() for g in groups]))
    first = per_proxy[0]
    if unit == "sequence":
        gids = np.concatenate([np.full(len(g), i) for i, g in enumerate(first)])
        lengths = np.concatenate([np.full(len(g), g.shape[1]) for g in first])
    else:
        gids = np.concatenate([np.full(g.size, i) for i, g in enumerate(first)])
        lengths = None
    return np.stack(rows), unit_weights(gids, lengths)


def _eval_device(choice: str) -> torch.device:
    return torch.device("cuda" if choice == "auto" and torch.cuda.is_available() else "cpu")


def learn_mixmin(pipe: Pipeline) -> Learned:
    cfg, groups = pipe.cfg, pipe.groups
    pcfg = cfg.method.get("pipeline", {})
    steps = int(pcfg.get("proxy_steps") or cfg.train.max_steps)
    unit = str(pcfg.get("logprob_unit", "sequence"))
    max_seqs = pcfg.get("target_max_seqs") or cfg.train.val_max_seqs
    dirs = [pipe.run(proxy_stage(cfg, k, steps))["run_dir"] for k in range(len(groups))]
    seqs = target_sequences(cfg, max_seqs)
    device = _eval_device(str(pcfg.get("eval_device", "cpu")))
    per_proxy = [token_log_probs(_final_weights(d), cfg, seqs, device) for d in dirs]
    logp, u = target_matrix(per_proxy, unit)
    lr, max_steps = float(pcfg.get("eg_lr", LR)), int(pcfg.get("eg_steps", MAX_STEPS))
    fit = solve_mixmin(logp, u, lr=lr, max_steps=max_steps, tol=float(pcfg.get("eg_tol", TOL)))
    p = fit.weights
    # diagnostic: proxy k's per-token NLL on group g's target sequences (row = trained group)
    nll = [[float(-g.mean()) for g in proxy] for proxy in per_proxy]
    pipe.log(
        f"[pipeline] mixmin: p = {np.round(p, 3).tolist()}; objective {fit.history[0]:.4f} -> "
        f"{fit.objective:.4f} in {fit.iterations} EG steps ({unit} units)"
    )
    info = {
        "unit": unit, "objective": fit.objective, "objective_uniform": fit.history[0],
        "iterations": fit.iterations, "stopped_by_tol": fit.stopped_by_tol, "history": fit.history,
        "proxy_steps": steps, "target_seqs": {g: len(s) for g, s in zip(groups, seqs)}, "proxy_nll": nll,
        "eg": {"lr": lr, "max_steps": max_steps},
    }  # fmt: skip
    return Learned(p=p, inputs=dirs, info={"learned_proportions": _named(p, groups), "mixmin": info})


def _final_weights(run_dir: str) -> str:
    ckpt = Path(run_dir) / "checkpoints" / "final.ckpt"
    if not ckpt.exists():
        raise RuntimeError(
            f"mixmin: proxy {run_dir} has no checkpoints/final.ckpt (its weights were not kept); "
            "remove that folder and run again to retrain it"
        )
    return str(ckpt)
