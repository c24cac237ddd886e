"""The cost estimate of `reproduce --dry-run`: the runs it counts are the runs the pipelines train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config

from aioli_repro.pipeline.cost import (
    SLIMPAJAMA_6B_TOKENS,
    method_runs,
    model_parameters,
    sweep_cost,
    table3_runs,
)
from aioli_repro.pipeline.recipes import run_method

MICRO = ["train.max_steps=4", "train.checkpoint_every=0", "train.val_every=0", "hp.grid.n_runs=2"]
EXTRA = {
    "doremi": ["method.pipeline.proxy_steps=3"],
    "doge": ["method.pipeline.proxy_steps=3"],
    # Skill-It's graph runs need their step-0 validation (val_every)
    "skillit": ["method.pipeline.graph_steps=2", "train.val_every=2", "method.mixer.update_steps=2"],
    "aioli": ["method.mixer.update_steps=4", "method.mixer.lp_rounds=1", "method.mixer.lp_steps=1"],
    "regmix": [
        "method.pipeline.swarm_size=3",
        "method.pipeline.swarm_steps=2",
        "method.pipeline.sim_candidates=500",
    ],
    "mixmin": ["method.pipeline.proxy_steps=2"],
    "ado": ["method.mixer.warmup_steps=1", "method.mixer.start_step=1", "method.mixer.fit_every=2"],
}
OTHERS = ("stratified", "grid", "dml", "doge", "skillit", "aioli", "regmix", "mixmin", "ado", "unimax")


@pytest.mark.slow  # trains each method's micro pipeline (the counting itself is checked below, fast)
@pytest.mark.parametrize("method", ["doremi", *OTHERS])
def test_the_runs_counted_are_the_runs_a_pipeline_trains(method: str, make_cfg, tmp_path: Path) -> None:
    extra = [*MICRO, *EXTRA.get(method, [])]
    cfg = make_cfg(f"method={method}", *extra)
    summary, _ = run_method(cfg, tmp_path, log=lambda s: None)
    trained = Counter(int(s["train_tokens"]) for s in summary["stages"])
    assert Counter(r.tokens for r in method_runs(cfg)) == trained


def test_shared_runs_count_once_and_the_totals_add_up() -> None:
    cfgs = [
        compose_config("scale=paper", f"method={m}", "groups=a_se", "seed=0", "cache_dir=/tmp/x")
        for m in ("stratified", "grid", "dml", "doremi")
    ]
    n = int(cfgs[1].method.pipeline.n_runs)
    # stratified (= DoReMi's reference), grid's sweep (= DML's), DML's final, DoReMi's proxy and final
    cost = sweep_cost("table2", cfgs)
    assert cost.runs == 1 + n + 1 + 2
    runs = {r.key: r for c in cfgs for r in method_runs(c)}
    assert cost.tokens == sum(r.tokens for r in runs.values())
    params = model_parameters(cfgs[0].model)
    assert 150e6 < params < 170e6  # Pythia-160m, untied embeddings
    t = cfgs[0].train
    assert runs[next(iter(runs))].flops == 6 * params * t.max_steps * t.batch_size * t.context_length
    assert cost.per_job_gb == pytest.approx(12 * params / 1e9)  # the measured 1.95 GB last.ckpt at 160M
    assert cost.data_gb == pytest.approx(2 * SLIMPAJAMA_6B_TOKENS * (0.046 + 0.033) / 1e9)


def test_table3_shortens_the_learning_runs_and_adds_two_full_finals() -> None:
    cfg = compose_config("scale=paper", "method=doremi", "groups=a_se", "seed=0", "cache_dir=/tmp/x")
    full, short = method_runs(cfg), table3_runs(cfg)
    half = float(cfg.restricted.fraction)
    assert [r.steps for r in short[:2]] == [round(r.steps * half) for r in full[:2]]  # reference, proxy
    assert [r.steps for r in short[2:]] == [int(cfg.train.max_steps)] * 2


def test_later_methods_share_one_swarm_and_count_their_proxies() -> None:
    cfgs = {
        m: compose_config("scale=miniature", f"method={m}", "groups=a_b_se", "seed=0", "cache_dir=/tmp/x")
        for m in ("regmix", "regmix_linear", "olmix", "mixmin", "ado", "unimax")
    }
    n = int(cfgs["regmix"].method.pipeline.swarm_size)
    swarm = sweep_cost("post", [cfgs[m] for m in ("regmix", "regmix_linear", "olmix")])
    assert swarm.runs == n + 3  # one swarm, three finals
    steps = int(cfgs["regmix"].method.pipeline.swarm_steps)
    full = int(cfgs["regmix"].train.max_steps)
    t = cfgs["regmix"].train
    assert swarm.tokens == (n * steps + 3 * full) * t.batch_size * t.context_length
    mixmin = method_runs(cfgs["mixmin"])
    assert len(mixmin) == 3 + 1 and mixmin[0].steps == int(cfgs["mixmin"].method.pipeline.proxy_steps)
    assert len(method_runs(cfgs["ado"])) == 1 and len(method_runs(cfgs["unimax"])) == 1
