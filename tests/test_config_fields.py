"""Every declared config field, given a bad value on the command line, fails validation naming the field.

`FIELD_CASES` lists each field of `aioli_repro.config.FIELDS` with a value of the wrong type, a value out
of its range (where it has one) and an empty value (where it is a list); each is composed as a Hydra
override and must raise a ConfigError whose message starts with the field's dotted name. The options
of `_target_` classes (data.source.*, method.mixer.*, and the hp.* values they interpolate) are checked
by those classes (tests/test_errors.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from aioli_repro.config import FIELDS, ConfigError, register_resolvers, validate_config

register_resolvers()

BASE = ["scale=tiny", "cache_dir=/tmp/x"]
# the method whose config has the field (method.pipeline.* exist only in multi-stage methods)
NEEDS = {
    "method.pipeline.n_runs": ["method=grid"],
    "method.pipeline.alpha": ["method=grid"],
    "method.pipeline.cover_seed": ["method=grid"],
    "method.pipeline.restarts": ["method=dml"],
    "method.pipeline.ridge": ["method=dml"],
    "method.pipeline.proxy_steps": ["method=doremi"],
    "method.pipeline.proxy_batch_size": ["method=doge"],
    "method.pipeline.graph_steps": ["method=skillit"],
    "method.pipeline.graph_eval_step": ["method=skillit"],
    "method.pipeline.n_children": ["method=dynamic_law"],
    "method.pipeline.branch_fraction": ["method=dynamic_law"],
    "method.pipeline.swarm_size": ["method=regmix"],
    "method.pipeline.swarm_steps": ["method=regmix"],
    "method.pipeline.swarm_seed": ["method=regmix"],
    "method.pipeline.swarm_jobs": ["method=regmix"],
    "method.pipeline.swarm_temperature": ["method=regmix"],
    "method.pipeline.swarm_min_strength": ["method=regmix"],
    "method.pipeline.swarm_max_strength": ["method=regmix"],
    "method.pipeline.swarm_n_strengths": ["method=regmix"],
    "method.pipeline.swarm_minimum": ["method=regmix"],
    "method.pipeline.swarm_max_usage": ["method=regmix"],
    "method.pipeline.swarm_oversample": ["method=regmix"],
    "method.pipeline.regressor": ["method=regmix"],
    "method.pipeline.lgbm_holdout": ["method=regmix"],
    "method.pipeline.lgbm_min_child_samples": ["method=regmix"],
    "method.pipeline.sim_candidates": ["method=regmix"],
    "method.pipeline.sim_top_k": ["method=regmix"],
    "method.pipeline.proposer": ["method=olmix"],
    "method.pipeline.kl_reg": ["method=olmix"],
    "method.pipeline.kl_bound": ["method=olmix"],
    "method.pipeline.huber_delta": ["method=olmix"],
    "method.pipeline.fit_steps": ["method=olmix"],
    "method.pipeline.fit_draws": ["method=olmix"],
    "method.pipeline.logprob_unit": ["method=mixmin"],
    "method.pipeline.eg_lr": ["method=mixmin"],
    "method.pipeline.eg_steps": ["method=mixmin"],
    "method.pipeline.eg_tol": ["method=mixmin"],
    "method.pipeline.target_max_seqs": ["method=mixmin"],
    "method.pipeline.eval_device": ["method=mixmin"],
    "method.pipeline.max_epochs": ["method=unimax"],
}

# field -> (wrong type, out of range or None, empty or None), as command-line values
FIELD_CASES: dict[str, tuple[str, str | None, str | None]] = {
    "seed": ("abc", "-1", None),
    "cache_dir": ("[a,b]", None, None),
    "results_dir": ("[a,b]", None, None),
    "progress": ("abc", None, None),
    "keep_checkpoints": ("abc", None, None),
    "progress_refresh": ("abc", "0", None),
    "num_threads": ("1.5", "0", None),
    "run_name": ("[a,b]", None, None),
    "scale_name": ("[a,b]", None, None),
    "groups.names": ("abc", "[arxiv]", "[]"),
    "groups.key": ("[a,b]", None, None),
    "groups.label": ("[a,b]", None, None),
    "train.max_steps": ("abc", "0", None),
    "train.batch_size": ("1.5", "0", None),
    "train.context_length": ("abc", "1", None),
    "train.eval_batch_size": ("abc", "0", None),
    "train.log_every": ("abc", "0", None),
    "train.lr": ("abc", "0", None),
    "train.min_lr": ("abc", "-1", None),
    "train.warmup_steps": ("abc", "-1", None),
    "train.weight_decay": ("abc", "-0.1", None),
    "train.grad_clip": ("abc", "-1", None),
    "train.val_max_seqs": ("abc", "0", None),
    "train.test_max_seqs": ("abc", "0", None),
    "train.val_every": ("abc", "-1", None),
    "train.checkpoint_every": ("abc", "-1", None),
    "train.composition": ("1", "bogus", None),
    "train.compile": ("abc", None, None),
    "trainer.accelerator": ("1", "bogus", None),
    "trainer.devices": ("abc", "0", "[]"),
    "trainer.precision": ("[a,b]", "bogus", None),
    "trainer.strategy": ("[a,b]", "bogus", None),
    "trainer.deterministic": ("1.5", "abc", None),
    "trainer.slurm_requeue": ("abc", None, None),
    "trainer.requeue_signal": ("1", "SIGKILL", None),
    "trainer.fused_optimizer": ("1.5", "sometimes", None),
    "trainer.tf32": ("1.5", "abc", None),
    "data.source._target_": ("123", None, None),
    "data.tokenizer": ("[a,b]", None, None),
    "data.label": ("[a,b]", None, None),
    "data.seed": ("abc", "-1", None),
    "data.verify_checksums": ("abc", None, None),
    "data.rebuild_on_mismatch": ("abc", None, None),
    "model._target_": ("123", None, None),
    "model.n_layer": ("abc", "0", None),
    "model.d_model": ("abc", "0", None),
    "model.n_head": ("abc", "0", None),
    "model.vocab_size": ("abc", "0", None),
    "model.context_length": ("abc", "0", None),
    "model.d_ff": ("abc", "0", None),
    "model.rotary_pct": ("abc", "1.5", None),
    "model.rotary_base": ("abc", "0", None),
    "model.layer_norm_eps": ("abc", "0", None),
    "model.parallel_residual": ("abc", None, None),
    "model.use_flash_attn": ("abc", None, None),
    "model.init_std": ("abc", "0", None),
    "model.bias": ("abc", None, None),
    "logger.wandb.mode": ("1", "bogus", None),
    "logger.wandb.project": ("[a,b]", None, None),
    "logger.wandb.entity": ("[a,b]", None, None),
    "restricted.fraction": ("abc", "1.5", None),
    "restricted.prior_steps": ("abc", "0", None),
    "method.name": ("[a,b]", None, None),
    "method.mixer._target_": ("123", None, None),
    "method.pipeline.n_runs": ("abc", "0", None),
    "method.pipeline.alpha": ("abc", "0", None),
    "method.pipeline.cover_seed": ("abc", "-1", None),
    "method.pipeline.restarts": ("abc", "0", None),
    "method.pipeline.ridge": ("abc", "-1", None),
    "method.pipeline.proxy_steps": ("abc", "0", None),
    "method.pipeline.proxy_batch_size": ("abc", "0", None),
    "method.pipeline.graph_steps": ("abc", "0", None),
    "method.pipeline.graph_eval_step": ("abc", "-1", None),
    "method.pipeline.n_children": ("abc", "0", None),
    "method.pipeline.branch_fraction": ("abc", "1.5", None),
    "method.pipeline.swarm_size": ("abc", "1", None),
    "method.pipeline.swarm_steps": ("abc", "0", None),
    "method.pipeline.swarm_seed": ("abc", "-1", None),
    "method.pipeline.swarm_jobs": ("abc", "0", None),
    "method.pipeline.swarm_temperature": ("abc", "1.5", None),
    "method.pipeline.swarm_min_strength": ("abc", "0", None),
    "method.pipeline.swarm_max_strength": ("abc", "0", None),
    "method.pipeline.swarm_n_strengths": ("abc", "0", None),
    "method.pipeline.swarm_minimum": ("abc", "0.6", None),
    "method.pipeline.swarm_max_usage": ("abc", "0.5", None),
    "method.pipeline.swarm_oversample": ("abc", "0", None),
    "method.pipeline.regressor": ("1", "bogus", None),
    "method.pipeline.lgbm_holdout": ("abc", "0.6", None),
    "method.pipeline.lgbm_min_child_samples": ("abc", "0", None),
    "method.pipeline.sim_candidates": ("abc", "0", None),
    "method.pipeline.sim_top_k": ("abc", "0", None),
    "method.pipeline.proposer": ("1", "bogus", None),
    "method.pipeline.kl_reg": ("abc", "-1", None),
    "method.pipeline.kl_bound": ("abc", "0", None),
    "method.pipeline.huber_delta": ("abc", "0", None),
    "method.pipeline.fit_steps": ("abc", "0", None),
    "method.pipeline.fit_draws": ("1.5", "31", None),
    "method.pipeline.logprob_unit": ("1", "bogus", None),
    "method.pipeline.eg_lr": ("abc", "0", None),
    "method.pipeline.eg_steps": ("abc", "0", None),
    "method.pipeline.eg_tol": ("abc", "-1", None),
    "method.pipeline.target_max_seqs": ("abc", "0", None),
    "method.pipeline.eval_device": ("1", "bogus", None),
    "method.pipeline.max_epochs": ("abc", "0", None),
}

# more values out of range, and bad combinations of fields: (overrides, the field the error names)
EXTRA_CASES: list[tuple[list[str], str]] = [
    (["groups.names=[arxiv,arxiv]"], "groups.names"),
    (["groups.names=[1,2]"], "groups.names"),
    (["groups.names=5"], "groups.names"),
    (["restricted.fraction=0"], "restricted.fraction"),
    (["train.lr=inf"], "train.lr"),
    (["train.min_lr=nan"], "train.min_lr"),
    (["train.min_lr=1.0"], "train.min_lr"),  # above train.lr
    (["train.context_length=512"], "train.context_length"),  # above model.context_length (256)
    (["model.n_head=3"], "model.d_model"),  # 128 not divisible by 3
    (["method=dynamic_law", "method.pipeline.n_children=2"], "method.pipeline.n_children"),  # < m + 1
    (["trainer.devices=[0,0]"], "trainer.devices"),
    (["seed=???"], "seed"),
    (["~train.max_steps"], "train.max_steps"),
    (["train.max_steps=${nowhere}"], "train.max_steps"),
    (["method.mixer._target_=null"], "method.mixer._target_"),
]


def _compose(*overrides: str):
    return compose_config(*[*BASE, *overrides])


def _cases() -> list:
    out = []
    for field, (wrong, out_of_range, empty) in FIELD_CASES.items():
        for what, value in (("type", wrong), ("range", out_of_range), ("empty", empty)):
            if value is not None:
                out.append(pytest.param(field, value, id=f"{field}-{what}"))
    return out


@pytest.mark.parametrize(("field", "value"), _cases())
def test_bad_value_names_the_field(field, value):
    cfg = _compose(*NEEDS.get(field, []), f"{field}={value}")
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert str(exc.value).startswith(f"{field}: "), str(exc.value)


@pytest.mark.parametrize(("overrides", "field"), EXTRA_CASES, ids=[" ".join(o) for o, _ in EXTRA_CASES])
def test_bad_combination_names_the_field(overrides, field):
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert str(exc.value).startswith(f"{field}: "), str(exc.value)


def test_the_table_covers_every_field():
    assert set(FIELD_CASES) == set(FIELDS)
    assert set(NEEDS) <= set(FIELDS)


# the options of `_target_` classes, checked by the classes; everything else must be in FIELDS
_CLASS_OWNED = ("data.source.", "method.mixer.", "hp.")


def _leaves(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


METHODS = ["stratified", "static", "grid", "dml", "skillit", "doremi", "doge", "aioli", "aioli_static",
           "aioli_diagonal", "aioli_mult", "aioli_null", "dynamic_law", "headroom", "regmix", "regmix_linear",
           "olmix", "mixmin", "ado", "unimax"]  # fmt: skip
COMPOSITIONS = (
    [[f"method={m}"] for m in METHODS]
    + [[f"scale={s}", "method=aioli"] for s in ("miniature", "paper", "table_smoke")]
    + [["trainer=gpu", "logger=none"], ["experiment=table3"], ["data=slimpajama", "model=pythia_70m"]]
    + [["data=local", "data.source.root=/tmp", "groups.names=[a,b]"]]
)


@pytest.mark.parametrize("overrides", COMPOSITIONS, ids=lambda o: " ".join(o))
def test_every_declared_field_is_validated(overrides):
    """Each leaf of the composed config is a field of FIELDS (or a class's option), and the config passes."""
    if overrides == ["method=static"]:
        overrides = [*overrides, "method.mixer.proportions=[0.5,0.5]"]
    cfg = _compose(*overrides)
    validate_config(cfg)
    leaves = _leaves(OmegaConf.to_container(cfg, resolve=True))
    unchecked = [p for p in leaves if p not in FIELDS and not p.startswith(_CLASS_OWNED)]
    assert not unchecked, f"declared but not validated (add them to aioli_repro.config.FIELDS): {unchecked}"


# -- the command line: one line naming the field, exit status 2, no traceback ---------------------------
@pytest.mark.parametrize(
    ("override", "field"),
    [("groups.names=5", "groups.names"), ("trainer.precision=bogus", "trainer.precision")],
)
def test_cli_bad_value_is_one_line_naming_the_field(override, field, tmp_path):
    args = ["scale=tiny", "logger=none", "progress=false", f"cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/run", override]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "aioli_repro.train", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {field}: "), r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
