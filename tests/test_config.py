"""Every setting x method x scale composes, and bad values fail early naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aioli_repro.config import SETTINGS, ConfigError, register_resolvers, validate_config
from aioli_repro.mixing.base import MixingContext

register_resolvers()

# every method config there is, so a new one joins the matrix without editing this file
METHODS = sorted(p.stem for p in (Path(CONF) / "method").glob("*.yaml"))


@pytest.mark.parametrize("scale", ["tiny", "paper"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_setting_and_method_composes(scale, setting):
    """The one config matrix: every setting x method x scale composes, validates, instantiates and sets up
    (its schedule constraints hold) with a mixture on the simplex. The method test files check only their
    own released hyper-parameter values."""
    m = len(SETTINGS[setting])
    for method in METHODS:
        extra = [f"method.mixer.proportions={[1 / m] * m}"] if method == "static" else []
        cfg = compose_config(
            f"scale={scale}", f"groups={setting}", f"method={method}", "cache_dir=/tmp/x", *extra
        )
        OmegaConf.resolve(cfg)
        assert list(cfg.groups.names) == SETTINGS[setting]
        assert cfg.method.name == method
        validate_config(cfg)
        if scale == "paper":
            assert cfg.train.max_steps == (40000 if setting == "slimpajama_all" else 5000)
            assert (cfg.train.batch_size, cfg.train.context_length) == (8, 2048)
        mixer = cfg.method.mixer
        if mixer.get("proportions", "x") is None:  # sweep/swarm/proxy points are filled by the pipeline
            assert method in ("grid", "dml", "regmix", "regmix_linear", "olmix", "mixmin", "unimax")
            continue
        method_obj = instantiate(mixer)
        graph = np.eye(m).tolist()  # Skill-It's graph comes from its pipeline's graph runs
        ctx = MixingContext(SETTINGS[setting], int(cfg.train.max_steps), int(cfg.train.batch_size), 0,
                            extras={"skills_graph": graph, "token_prior": [1 / m] * m})  # fmt: skip
        method_obj.setup(ctx)
        p = np.asarray(method_obj.proportions())
        assert p.shape == (m,) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-9, (method, p)


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
    cfg = compose_config(*["scale=tiny", "cache_dir=/tmp/x", override])
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
    for method in ("doremi", "doge", "skillit"):
        cfg = compose_config(*["scale=paper", f"groups.names=[{','.join(names)}]", f"method={method}"])
        steps = cfg.train.max_steps
        assert steps == 40000 and cfg.hp.doremi.proxy_steps == steps and cfg.hp.doge.proxy_steps == steps
        assert cfg.hp.skillit.graph_steps == steps and cfg.hp.aioli.lp_rounds == 2  # the m = 7 values
        assert cfg.groups.key == "_".join(names)


def test_register_resolvers_is_idempotent():
    register_resolvers()
    register_resolvers()
    for name in ("by_m", "setting_key", "setting_label"):
        assert OmegaConf.has_resolver(name)


def test_importing_config_registers_nothing_and_validate_registers(tmp_path):
    """No import side effect: a fresh process that imports the package has no resolvers until it calls
    `validate_config` (which every config passes) or `compose_train`; a config composed with Hydra's own
    `compose` then resolves `by_m` (paper max_steps for m = 7)."""
    code = (
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "import aioli_repro.config as c, aioli_repro.pipeline.recipes, aioli_repro.training.run\n"
        "print(OmegaConf.has_resolver('by_m'))\n"
        "with initialize_config_dir(config_dir=str(c.CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['scale=paper', 'groups=slimpajama_all', 'cache_dir=/tmp/x'])\n"
        "c.validate_config(cfg)\n"
        "print(OmegaConf.has_resolver('by_m'), cfg.train.max_steps, cfg.groups.key)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["False", "True", "40000", "slimpajama_all"]


# -- stage hashes: declaring a key in conf/ must not orphan finished results ----------------------------
# (overrides of a sweep job, its pipeline folder's hash as computed before the keys below were declared)
PINNED_HASHES = [
    (
        ["experiment=table2", "scale=table_smoke", "groups=a_se", "method=stratified", "seed=0"],
        "4a2a9139c883",
    ),
    (["experiment=table2", "scale=miniature", "groups=a_se", "method=aioli", "seed=0"], "91abeaaa3009"),
    (["experiment=table2", "scale=paper", "groups=slimpajama_all", "method=doge", "seed=0"], "df8326f15fb8"),
]


@pytest.mark.parametrize(("overrides", "expected"), PINNED_HASHES, ids=[h for _, h in PINNED_HASHES])
def test_stage_hashes_of_finished_results_do_not_change(overrides, expected):
    from aioli_repro.pipeline.stage import stage_hash

    cfg = compose_config(*[*overrides, "cache_dir=/tmp/x"])
    assert stage_hash(cfg) == expected


def test_late_declared_keys_stay_out_of_the_identity(make_cfg):
    """trainer.slurm_requeue / requeue_signal, data.verify_checksums / rebuild_on_mismatch and restricted.*
    never change a stage hash; data.seed does, except at 0, the value it had before it was declared."""
    from aioli_repro.pipeline.stage import stage_hash
    from aioli_repro.training.identity import stage_identity

    base = stage_hash(make_cfg())
    free = ["trainer.slurm_requeue=false", "trainer.requeue_signal=SIGUSR2", "data.verify_checksums=false",
            "data.rebuild_on_mismatch=true", "restricted.fraction=0.25", "data.seed=0"]  # fmt: skip
    assert stage_hash(make_cfg(*free)) == base
    assert stage_hash(make_cfg("data.seed=1")) != base
    ident = stage_identity(make_cfg())
    assert "restricted" not in ident and "seed" not in ident["data"]
    assert not {"slurm_requeue", "requeue_signal"} & set(ident["trainer"])
    assert not {"verify_checksums", "rebuild_on_mismatch"} & set(ident["data"])


@pytest.mark.parametrize(
    ("variant", "own"),
    [
        ("aioli_mult", {"update_rule": "multiplicative"}),
        ("aioli_null", {"eta": 0.0}),
        ("aioli_static", {"update_steps": None}),
        ("aioli_diagonal", {"diagonal": True}),
    ],
)
@pytest.mark.parametrize("scale", ["miniature", "paper"])
def test_aioli_variants_inherit_everything_else_from_aioli(variant, own, scale):
    """Each variant file holds only what differs (its name and mixer keys); the rest comes from aioli.yaml."""
    base, var = (
        OmegaConf.to_container(
            compose_config(*[f"scale={scale}", "groups=slimpajama_all", f"method={m}", "run_name=r"]),
            resolve=True,
        )
        for m in ("aioli", variant)
    )
    assert var["method"]["name"] == variant
    assert {k: var["method"]["mixer"][k] for k in own} == own
    var["method"] = {
        "name": "aioli",
        "mixer": {**var["method"]["mixer"], **{k: base["method"]["mixer"][k] for k in own}},
    }
    assert var == base
