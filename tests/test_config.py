"""Every setting x method x scale composes, and bad values fail early naming the field."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aioli_repro.config import SETTINGS, ConfigError, validate_config
from tests.conftest import CONF

METHODS = [
    "stratified",
    "grid",
    "dml",
    "skillit",
    "doremi",
    "doge",
    "aioli",
    "aioli_static",
    "aioli_diagonal",
]


@pytest.mark.parametrize("scale", ["tiny", "paper"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_setting_and_method_composes(scale, setting):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for method in METHODS:
            cfg = compose(
                "train",
                overrides=[f"scale={scale}", f"groups={setting}", f"method={method}", "cache_dir=/tmp/x"],
            )
            OmegaConf.resolve(cfg)
            assert list(cfg.groups.names) == SETTINGS[setting]
            assert cfg.method.name == method
            validate_config(cfg)
            mixer = cfg.method.mixer
            if mixer.get("proportions", "x") is None:  # grid/dml sweep points are filled by the pipeline
                continue
            instantiate(mixer)
            if scale == "paper":
                expected = 40000 if setting == "slimpajama_all" else 5000
                assert cfg.train.max_steps == expected
                assert (cfg.train.batch_size, cfg.train.context_length) == (8, 2048)


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.context_length=512", "train.context_length"),  # tiny model's context is 256
        ("train.max_steps=0", "train.max_steps"),
        ("train.composition=bogus", "train.composition"),
        ("train.min_lr=1.0", "train.min_lr"),
        ("groups.names=[arxiv]", "groups.names"),
        ("groups.names=[arxiv,arxiv]", "groups.names"),
    ],
)
def test_bad_config_names_field(override, field):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["scale=tiny", "cache_dir=/tmp/x", override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(cfg)


@pytest.mark.parametrize(
    "overrides, key, label",
    [
        ([], "a_se", "A/SE"),
        (["groups=slimpajama_all"], "slimpajama_all", "SlimPajama"),
        (["groups.names=[stackexchange,arxiv]"], "stackexchange_arxiv", "stackexchange/arxiv"),
        (["data=local", "data.source.root=/tmp", "groups.names=[code,docs,prose]"], "code_docs_prose",
         "code/docs/prose"),
        (["groups.names=[my code,docs]", "groups.label=Mine"], "my-code_docs", "Mine"),
        (["groups=gh_c4", "groups.key=gh"], "gh", "GH/C4"),
    ],
)  # fmt: skip
def test_setting_names_follow_the_groups(make_cfg, overrides, key, label):
    """Own groups never run, save or tabulate under a paper setting's name; a given key/label wins."""
    cfg = make_cfg(*overrides)
    assert (cfg.groups.key, cfg.groups.label) == (key, label)
    assert cfg.run_name == f"stratified-{key}-s0"


@pytest.mark.parametrize("names", [SETTINGS["a_b_se"] + ["github"], SETTINGS["cc_gh_w"] + ["c4", "book"]])
def test_four_and_five_groups_follow_one_per_m_rule(names):
    """m >= 4 takes the m = 7 value of every key, step counts included (no 5k-step run, 40k-step proxies)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for method in ("doremi", "doge", "skillit"):
            cfg = compose(
                "train", overrides=["scale=paper", f"groups.names=[{','.join(names)}]", f"method={method}"]
            )
            steps = cfg.train.max_steps
            assert steps == 40000 and cfg.hp.doremi.proxy_steps == steps and cfg.hp.doge.proxy_steps == steps
            assert cfg.hp.skillit.graph_steps == steps and cfg.hp.aioli.lp_rounds == 2  # the m = 7 values
            assert cfg.groups.key == "_".join(names)
