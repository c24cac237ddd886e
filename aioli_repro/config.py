"""Config helpers: Hydra resolvers, and one validation pass whose errors name the field.

`register_resolvers()` registers the `by_m`, `setting_key`, `setting_label` and `half` resolvers the
configs in `conf/` use (idempotent). Importing this module does not: the entry points call it before
Hydra composes, `compose_train` (the one way the package composes `conf/train.yaml` itself) calls it,
and so does `validate_config`, which every config passes before it is used (a caller's own `compose`
included).

`CheckRunName`, a Hydra callback (`hydra.callbacks` in `conf/train.yaml`, so every entry point has it),
checks the fields of `run_name` before Hydra names its run folder after it (`groups=[]` has no
`groups.key`): a bad one is one `error: ...` line and exit status 2, and no folder is made.

`validate_config(cfg)` checks every field of `FIELDS` (type, range, allowed values) and the relations
between fields, before any data is built or any model allocated. Each error is a `ConfigError` whose
message starts with the dotted field name (`train.lr: must be a number > 0, got 'abc'`). The options
of a class named by `_target_` (`data.source.*`, `method.mixer.*`, fed by `hp.*`) are checked by that
class when it is built, with messages that name the field the same way.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from aioli_repro.data.source import SLIMPAJAMA_GROUPS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A bad config value. The message names the field and the allowed values."""


# The paper's six settings (config name -> groups).
SETTINGS: dict[str, list[str]] = {
    "a_se": ["arxiv", "stackexchange"],
    "gh_c4": ["github", "c4"],
    "b_se": ["book", "stackexchange"],
    "a_b_se": ["arxiv", "book", "stackexchange"],
    "cc_gh_w": ["commoncrawl", "github", "wikipedia"],
    "slimpajama_all": list(SLIMPAJAMA_GROUPS),
}


def _as_names(names: object) -> list:
    """groups.names as a list; any other value as a one-element list, so that a resolver never fails
    on a bad value (validate_config reports it, naming groups.names)."""
    return list(names) if isinstance(names, (list, tuple, ListConfig)) else [names]


def is_paper_setting(key: str, names: list) -> bool:
    """True when `names` are exactly the groups of the paper setting `key` (in its order)."""
    return SETTINGS.get(str(key)) == [str(n) for n in _as_names(names)]


def setting_key(paper_key: str, names: list) -> str:
    """The setting's key: the paper's (e.g. `a_se`) for its own groups, else derived from the names.

    Own data (`data=local groups.names=[code,docs,prose]`) must not run, save or tabulate under a
    paper setting's name: its key becomes `code_docs_prose`, safe in file and run names."""
    if is_paper_setting(paper_key, names):
        return str(paper_key)
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(n)).strip("-") or "group" for n in _as_names(names))


def setting_label(paper_key: str, paper_label: str, names: list) -> str:
    """The setting's label in tables: the paper's (e.g. `A/SE`) for its own groups, else `code/docs/prose`."""
    if is_paper_setting(paper_key, names):
        return str(paper_label)
    return "/".join(map(str, _as_names(names)))


def _by_m(names: list, v2: object, v3: object, v7: object) -> object:
    """A per-setting value by the number of groups m: the released scripts give values for m = 2, 3, 7.

    The one rule for every key, step counts included: m <= 2 takes the m = 2 value, m = 3 the m = 3
    value, and m >= 4 the m = 7 value. So a 5-group setting at paper scale trains 40k steps, and its
    DoReMi/DoGE proxies and Skill-It graph runs are as long as its run, as at m = 7."""
    m = len(_as_names(names))
    return v2 if m <= 2 else (v3 if m <= 3 else v7)


def _half(v: object) -> int:
    """Half of a positive count, at least 1: a variant with twice the rounds at the same LearnParams share
    (`method=aioli_t2x`) halves both the round length and the sweeps per round, at any scale."""
    return max(1, int(v) // 2)


_RESOLVERS = {"by_m": _by_m, "setting_key": setting_key, "setting_label": setting_label, "half": _half}


def register_resolvers() -> None:
    """Register the OmegaConf resolvers that `conf/` uses; calling it again does nothing."""
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_train(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """`conf/train.yaml` composed with Hydra overrides, resolvers registered (outside `@hydra.main`)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


# -- the fields ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """What one config value may be.

    kind: int | number | bool | str | choice | signal | names | devices. `low` / `high` bound an int or
    number (`low_open`: strictly above `low`). `null`: null is allowed, and what it means. `optional`:
    the field may be absent (the code that reads it has the same default as `conf/`). `missing`: the
    message when a required field is absent."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    null: str | None = None
    choices: tuple = ()
    optional: bool = False
    missing: str = "every config needs it"

    def describe(self) -> str:
        if self.kind in ("int", "number"):
            what = "an integer" if self.kind == "int" else "a finite number"
            lo = None if self.low is None else f"{self.low:g}"
            hi = None if self.high is None else f"{self.high:g}"
            if lo is not None and hi is not None:
                what += f" in {'(' if self.low_open else '['}{lo}, {hi}]"
            elif lo is not None:
                what += f" {'>' if self.low_open else '>='} {lo}"
            elif hi is not None:
                what += f" <= {hi}"
        else:
            what = {
                "bool": "true or false",
                "str": "a non-empty string",
                "names": "a list of at least 2 distinct group names",
                "devices": "an integer >= 1, -1 (all), 'auto', or a non-empty list of distinct indices",
            }.get(self.kind, f"one of {list(self.choices)}")
        return f"null ({self.null}) or {what}" if self.null else what

    def accepts(self, v: Any) -> bool:
        if v is None:
            return self.null is not None
        if self.kind in ("int", "number"):
            ok_type = isinstance(v, int) if self.kind == "int" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or not math.isfinite(v):
                return False
            if self.low is not None and (v <= self.low if self.low_open else v < self.low):
                return False
            return self.high is None or v <= self.high
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str) and v.strip() != ""
        if self.kind == "choice":
            return any(type(v) is type(c) and v == c for c in self.choices)
        if self.kind == "signal":
            return isinstance(v, str) and _signal_name(v) in self.choices
        if self.kind == "devices":
            if isinstance(v, list):
                ints = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
                return bool(v) and ints and len(set(v)) == len(v)
            return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1))
        raise AssertionError(f"unknown field kind {self.kind!r}")  # a bug in FIELDS


def _signal_name(v: str) -> str:
    name = v.strip().upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def _int(low: int = 1, **kw: Any) -> Field:
    return Field("int", low=low, **kw)


def _num(**kw: Any) -> Field:
    return Field("number", **kw)


_BOOL, _STR = Field("bool"), Field("str")
_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT")  # as aioli_repro/training/slurm.py (USR1 etc. too)
_PRECISIONS = ("auto", "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
               "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)  # fmt: skip

# Every field of `conf/` outside the options of a `_target_` class (data.source.*, method.mixer.*; the
# hp.* values they interpolate), by dotted path. tests/test_config_fields.py checks each with bad values,
# and that every leaf of the composed configs is here.
# Lightning strategies for one run (multi-device runs are refused for now: see training/preflight.py)
_STRATEGIES = (
    "auto",
    "single_device",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "fsdp",
    "deepspeed",
)

FIELDS: dict[str, Field] = {
    # top level
    "seed": _int(0),
    "cache_dir": _STR,
    "results_dir": _STR,
    "progress": _BOOL,
    "progress_refresh": _num(low=0, low_open=True),
    "num_threads": _int(1, null="torch's default"),
    "run_name": _STR,
    "scale_name": _STR,
    "keep_checkpoints": Field("bool", optional=True),
    # groups (names first: other fields interpolate by_m on it)
    "groups.names": Field("names", missing="no setting chosen: pick one, e.g. groups=a_se"),
    "groups.key": _STR,
    "groups.label": _STR,
    # train
    "train.max_steps": _int(1),
    "train.batch_size": _int(1),
    "train.context_length": _int(2),
    "train.eval_batch_size": _int(1),
    "train.log_every": _int(1),
    "train.lr": _num(low=0, low_open=True),
    "train.min_lr": _num(low=0),
    "train.warmup_steps": _int(0),
    "train.weight_decay": _num(low=0),
    "train.grad_clip": _num(low=0, null="no clipping"),
    "train.val_max_seqs": _int(1, null="all"),
    "train.test_max_seqs": _int(1, null="all"),
    "train.val_every": _int(0, null="only at the end"),
    "train.checkpoint_every": _int(0, null="no periodic checkpoints"),
    "train.composition": Field("choice", choices=("multinomial", "exact")),
    "train.compile": Field("bool", optional=True),
    # trainer
    "trainer.accelerator": Field("choice", choices=("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    "trainer.devices": Field("devices"),
    "trainer.strategy": Field("choice", choices=_STRATEGIES, optional=True),
    "trainer.precision": Field("choice", choices=_PRECISIONS),
    "trainer.deterministic": Field("choice", choices=(True, False, "warn"), optional=True),
    "trainer.slurm_requeue": Field("bool", optional=True),
    "trainer.requeue_signal": Field("signal", choices=_SIGNALS, optional=True),
    "trainer.fused_optimizer": Field("choice", choices=("auto", True, False), optional=True),
    "trainer.tf32": Field("choice", choices=("auto", True, False), optional=True),
    # data
    "data.source._target_": Field("str", missing="every data config needs a source with a _target_ class"),
    "data.tokenizer": _STR,
    "data.label": Field("str", optional=True),
    "data.seed": _int(0, optional=True),
    "data.verify_checksums": Field("bool", optional=True),
    "data.rebuild_on_mismatch": Field("bool", optional=True),
    # model (aioli_repro.model.ModelConfig; the fields it gives defaults to are optional)
    "model._target_": _STR,
    "model.n_layer": _int(1),
    "model.d_model": _int(1),
    "model.n_head": _int(1),
    "model.vocab_size": _int(1),
    "model.context_length": _int(1),
    "model.d_ff": _int(1, null="4 * d_model", optional=True),
    "model.rotary_pct": _num(low=0, high=1, optional=True),
    "model.rotary_base": _num(low=0, low_open=True, optional=True),
    "model.layer_norm_eps": _num(low=0, low_open=True, optional=True),
    "model.parallel_residual": Field("bool", optional=True),
    "model.use_flash_attn": Field("bool", optional=True),
    "model.init_std": _num(low=0, low_open=True, optional=True),
    "model.bias": Field("bool", optional=True),
    # logger
    "logger.wandb.mode": Field("choice", choices=("offline", "online", "disabled")),
    "logger.wandb.project": _STR,
    "logger.wandb.entity": Field("str", null="your W&B default entity"),
    # restricted setting (python -m aioli_repro.restricted; absent from the configs of its stages)
    "restricted.fraction": _num(low=0, high=1, low_open=True, optional=True),
    "restricted.prior_steps": _int(1, null="hp.aioli.update_steps", optional=True),
    # method (its mixer's options are checked by the mixer class)
    "method.name": _STR,
    "method.mixer._target_": Field("str", missing="every method config needs a mixer with a _target_ class"),
    # method.pipeline: the multi-stage methods' options (only where the method has them)
    "method.pipeline.n_runs": _int(1, optional=True),
    "method.pipeline.alpha": _num(low=0, low_open=True, optional=True),
    "method.pipeline.cover_seed": _int(0, optional=True),
    "method.pipeline.restarts": _int(1, optional=True),
    "method.pipeline.ridge": _num(low=0, optional=True),
    "method.pipeline.proxy_steps": _int(1, optional=True),
    "method.pipeline.proxy_batch_size": _int(1, optional=True),
    "method.pipeline.graph_steps": _int(1, optional=True),
    "method.pipeline.graph_eval_step": _int(0, null="the end of the graph run", optional=True),
    "method.pipeline.n_children": _int(1, null="m + 1", optional=True),
    "method.pipeline.branch_fraction": _num(low=0, high=1, low_open=True, optional=True),
    # -- swarm methods (RegMix, Olmix): proxy runs on Dirichlet mixtures; pipeline/swarm.py
    "method.pipeline.swarm_size": _int(2, optional=True),
    "method.pipeline.swarm_steps": _int(1, null="the run's max_steps", optional=True),
    "method.pipeline.swarm_seed": _int(0, optional=True),
    "method.pipeline.swarm_jobs": _int(1, optional=True),
    "method.pipeline.swarm_temperature": _num(low=0, high=1, low_open=True, optional=True),
    "method.pipeline.swarm_min_strength": _num(low=0, low_open=True, optional=True),
    "method.pipeline.swarm_max_strength": _num(low=0, low_open=True, optional=True),
    "method.pipeline.swarm_n_strengths": _int(1, optional=True),
    "method.pipeline.swarm_minimum": _num(low=0, high=0.5, optional=True),
    "method.pipeline.swarm_max_usage": _num(low=1, optional=True),
    "method.pipeline.swarm_oversample": _int(1, optional=True),
    # RegMix (pipeline/regmix.py): the regression and the simulated optimum
    "method.pipeline.regressor": Field("choice", choices=("lightgbm", "linear"), optional=True),
    "method.pipeline.lgbm_holdout": _num(low=0, high=0.5, optional=True),
    "method.pipeline.lgbm_min_child_samples": _int(1, null="the released leaf share, >= 2", optional=True),
    "method.pipeline.sim_candidates": _int(1, optional=True),
    "method.pipeline.sim_top_k": _int(1, optional=True),
    # -- end swarm
    # -- Olmix (pipeline/olmix.py)
    "method.pipeline.proposer": Field("choice", choices=("exact", "simulation", "search"), optional=True),
    "method.pipeline.kl_reg": _num(low=0, optional=True),
    "method.pipeline.kl_bound": _num(low=0, low_open=True, null="the kl_reg penalty", optional=True),
    "method.pipeline.huber_delta": _num(low=0, low_open=True, optional=True),
    "method.pipeline.fit_steps": _int(1, optional=True),
    "method.pipeline.fit_draws": _int(1, high=30, optional=True),
    # -- end olmix
    # -- MixMin (pipeline/mixmin.py)
    "method.pipeline.logprob_unit": Field("choice", choices=("sequence", "token"), optional=True),
    "method.pipeline.eg_lr": _num(low=0, low_open=True, optional=True),
    "method.pipeline.eg_steps": _int(1, optional=True),
    "method.pipeline.eg_tol": _num(low=0, optional=True),
    "method.pipeline.target_max_seqs": _int(1, null="train.val_max_seqs", optional=True),
    "method.pipeline.eval_device": Field("choice", choices=("cpu", "auto"), optional=True),
    # -- end mixmin
    # -- UniMax (pipeline/unimax.py)
    "method.pipeline.max_epochs": _num(low=0, low_open=True, optional=True),
    # -- end unimax
}

_ABSENT = object()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _value(cfg: DictConfig, path: str) -> Any:
    """The resolved value at `path` (plain Python), `_ABSENT` if there is none; omegaconf errors (an
    interpolation that does not resolve, `???`) become a ConfigError naming the field."""
    try:
        v = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=True)
        if isinstance(v, (DictConfig, ListConfig)):
            v = OmegaConf.to_container(v, resolve=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{path}: has no value (???); set it on the command line: {path}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot be resolved: {_one_line(e)}") from None
    return v


def _check_names(v: Any) -> list[str]:
    if v is None or (isinstance(v, list) and not v):
        raise ConfigError(f"groups.names: need a non-empty list of groups, got {v!r}")
    if not isinstance(v, list) or not all(isinstance(n, str) and n.strip() for n in v):
        raise ConfigError(f"groups.names: must be a list of group names (non-empty strings), got {v!r}")
    if len(v) < 2:
        raise ConfigError(f"groups.names: mixing needs at least 2 groups, got {v}")
    if len(set(v)) != len(v):
        raise ConfigError(f"groups.names: duplicate groups in {v}")
    return v


def _check_field(cfg: DictConfig, path: str, field: Field) -> Any:
    v = _value(cfg, path)
    if v is _ABSENT:
        if field.optional:
            return None
        raise ConfigError(f"{path}: missing ({field.missing})")
    if field.kind == "names":
        return _check_names(v)
    if not field.accepts(v):
        if field.kind in ("choice", "signal") and v is not None:
            raise ConfigError(f"{path}: unknown value {v!r}; allowed: {list(field.choices)}")
        raise ConfigError(f"{path}: must be {field.describe()}, got {v!r}")
    return v


def validate_config(cfg: DictConfig) -> None:
    """Check every field of `FIELDS`, then the relations between fields, before any data is built or any
    model allocated. Raises a ConfigError whose message starts with the field's dotted name.
    Registers the resolvers first: every config passes here before it is used, however it was composed."""
    register_resolvers()
    names = _check_field(cfg, "groups.names", FIELDS["groups.names"])
    v = {path: _check_field(cfg, path, field) for path, field in FIELDS.items() if path != "groups.names"}
    ctx, model_ctx = v["train.context_length"], v["model.context_length"]
    if ctx > model_ctx:
        raise ConfigError(
            f"train.context_length: {ctx} exceeds the model's maximum context "
            f"(model.context_length={model_ctx})"
        )
    lr, min_lr = v["train.lr"], v["train.min_lr"]
    if min_lr > lr:
        raise ConfigError(f"train.min_lr: must be in [0, train.lr={lr}], got {min_lr!r}")
    d_model, n_head = v["model.d_model"], v["model.n_head"]
    if d_model % n_head:
        raise ConfigError(f"model.d_model: {d_model} is not divisible by model.n_head={n_head}")
    n_children = v["method.pipeline.n_children"]
    if n_children is not None and n_children < len(names) + 1:
        raise ConfigError(
            f"method.pipeline.n_children: needs at least m + 1 = {len(names) + 1} children, got {n_children}"
        )


def user_error_exit(e: Exception) -> None:
    """What every entry point does with a user error: one line on stderr (no traceback), exit status 2."""
    msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# What conf/train.yaml's run_name (and so Hydra's run folder, hydra.run.dir) is made of; groups.names first
RUN_NAME_FIELDS = ("groups.names", "groups.key", "method.name", "seed", "run_name")


def check_run_name(cfg: DictConfig) -> None:
    """Check the fields of `run_name` (a ConfigError naming the field), so that it resolves."""
    register_resolvers()
    for path in RUN_NAME_FIELDS:
        _check_field(cfg, path, FIELDS[path])


class CheckRunName(Callback):
    """Hydra resolves `hydra.run.dir` (and a sweep job's subdir), which holds `run_name`, before an entry
    point's main runs: a field of it that does not resolve (`groups=[]`) would fail inside Hydra, with a
    traceback, and a bad one would name a folder. This checks them first (the whole command's config for
    a multirun), as one `error: ...` line and exit status 2 (a SystemExit: Hydra warns on exceptions)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_run_name(config)
        except ConfigError as e:
            user_error_exit(e)
