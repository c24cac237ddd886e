"""Config helpers: Hydra resolvers, early validation with errors that name the field."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from aioli_repro.data.source import SLIMPAJAMA_GROUPS


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


def is_paper_setting(key: str, names: list) -> bool:
    """True when `names` are exactly the groups of the paper setting `key` (in its order)."""
    return SETTINGS.get(str(key)) == [str(n) for n in names]


def setting_key(paper_key: str, names: list) -> str:
    """The setting's key: the paper's (e.g. `a_se`) for its own groups, else derived from the names.

    Own data (`data=local groups.names=[code,docs,prose]`) must not run, save or tabulate under a
    paper setting's name: its key becomes `code_docs_prose`, safe in file and run names."""
    if is_paper_setting(paper_key, names):
        return str(paper_key)
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(n)).strip("-") or "group" for n in names)


def setting_label(paper_key: str, paper_label: str, names: list) -> str:
    """The setting's label in tables: the paper's (e.g. `A/SE`) for its own groups, else `code/docs/prose`."""
    return str(paper_label) if is_paper_setting(paper_key, names) else "/".join(map(str, names))


def register_resolvers() -> None:
    for name, fn in (
        ("by_m", _by_m),
        ("setting_key", setting_key),
        ("setting_label", setting_label),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _positive_int(cfg: DictConfig, path: str, minimum: int = 1) -> int:
    v = OmegaConf.select(cfg, path)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{path}: must be an integer >= {minimum}, got {v!r}")
    return v


def validate_config(cfg: DictConfig) -> None:
    """Check the fields the run depends on before any data is built or any model allocated."""
    names = OmegaConf.select(cfg, "groups.names")
    if not names or not isinstance(list(names), list):
        raise ConfigError(f"groups.names: need a non-empty list of groups, got {names!r}")
    names = list(names)
    if len(names) < 2:
        raise ConfigError(f"groups.names: mixing needs at least 2 groups, got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"groups.names: duplicate groups in {names}")
    for path in ("train.max_steps", "train.batch_size", "train.context_length", "train.eval_batch_size"):
        _positive_int(cfg, path)
    _positive_int(cfg, "train.log_every")
    for path in ("train.val_max_seqs", "train.test_max_seqs"):
        v = OmegaConf.select(cfg, path)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{path}: must be null (all) or an integer >= 1, got {v!r}")
    ctx = cfg.train.context_length
    model_ctx = OmegaConf.select(cfg, "model.context_length")
    if model_ctx is not None and ctx > model_ctx:
        raise ConfigError(
            f"train.context_length: {ctx} exceeds the model's maximum context "
            f"(model.context_length={model_ctx})"
        )
    if ctx < 2:
        raise ConfigError(f"train.context_length: must be >= 2, got {ctx}")
    comp = OmegaConf.select(cfg, "train.composition")
    if comp not in ("multinomial", "exact"):
        raise ConfigError(f"train.composition: unknown value {comp!r}; allowed: ['multinomial', 'exact']")
    lr, min_lr = cfg.train.lr, cfg.train.min_lr
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"train.lr: must be > 0, got {lr!r}")
    if not (isinstance(min_lr, (int, float)) and 0 <= min_lr <= lr):
        raise ConfigError(f"train.min_lr: must be in [0, train.lr={lr}], got {min_lr!r}")
    if OmegaConf.select(cfg, "method.mixer._target_") is None:
        raise ConfigError("method.mixer._target_: every method config needs a mixer with a _target_ class")


def _by_m(names: list, v2: object, v3: object, v7: object) -> object:
    """A per-setting value by the number of groups m: the released scripts give values for m = 2, 3, 7.

    The one rule for every key, step counts included: m <= 2 takes the m = 2 value, m = 3 the m = 3
    value, and m >= 4 the m = 7 value. So a 5-group setting at paper scale trains 40k steps, and its
    DoReMi/DoGE proxies and Skill-It graph runs are as long as its run, as at m = 7."""
    m = len(names)
    return v2 if m <= 2 else (v3 if m <= 3 else v7)


register_resolvers()
