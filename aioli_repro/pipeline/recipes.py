"""Each method's stages, end to end, for one setting and seed.

    stratified / static / aioli*   one run
    grid                           sweep of static runs over a simplex cover -> best by val avg ppl
    dml                            the same sweep (shared) -> fit the log-linear law on val -> final run
    skillit                        m one-hot graph runs -> skills graph -> online run
    doremi                         reference (= the stratified run) -> proxy -> final run on mean weights
    doge                           proxy -> final run on mean weights
    headroom                       (analysis) static runs on a dense fixed grid -> the best static mixture
    dynamic_law                    (analysis) branch sweep from the stratified run -> linear dynamic law fit

Every final summary records the training tokens of all stages that produced it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from aioli_repro import world
from aioli_repro.config import ConfigError, validate_config
from aioli_repro.fileio import atomic_write_json
from aioli_repro.pipeline.stage import Stage, read_summary, result_dir, stage_hash, stage_lock
from aioli_repro.training.callbacks import trajectory_records
from aioli_repro.training.preflight import Preflight, preflight
from aioli_repro.training.run import run_training
from aioli_repro.training.run_dirs import UNUSED_RUN_FILES, remove_if_unused


def derive(cfg: DictConfig, name: str, mixer: dict, **train: object) -> DictConfig:
    """A copy of cfg that runs `mixer` (labelled `name`) with some train fields replaced."""
    new = copy.deepcopy(cfg)
    OmegaConf.set_struct(new, False)
    new.method = OmegaConf.create({"name": name, "mixer": mixer})
    for k, v in train.items():
        if v is not None:
            new.train[k] = v
    return new


def static_mixer(p: np.ndarray | list[float]) -> dict:
    return {"_target_": "aioli_repro.mixing.static.Static", "proportions": [float(x) for x in p]}


STRATIFIED = {"_target_": "aioli_repro.mixing.static.Stratified"}
# a stage folder before its run wrote anything: the stage lock and record, the training lock
_UNUSED_STAGE_FILES = UNUSED_RUN_FILES | {".lock", "stage.json"}


class Pipeline:
    """Runs stages under one results root, never redoing a finished one."""

    def __init__(self, cfg: DictConfig, results_dir: str | Path, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.results_dir = Path(results_dir)
        self.log = log
        self.done: list[dict] = []  # {name, dir, train_tokens, reused}

    def run(self, stage: Stage) -> dict:
        d = stage.directory(self.results_dir)
        summary = read_summary(d)
        reused = summary is not None
        if summary is None:
            # everything bad input can fail, before the stage's folder exists or "training in" is said
            checked = preflight(stage.cfg, extras=stage.extras)
            if not world.is_launch_zero():  # DDP rank > 0: trains beside rank 0, which locks and writes
                return run_training(stage.cfg, d, extras=stage.extras, checked=checked)
            with stage_lock(d):
                summary = read_summary(d)  # another process may have finished it meanwhile
                reused = summary is not None
                if summary is None:
                    summary = self._train(stage, d, checked)
        if reused:
            self.log(f"[pipeline] stage {stage.name}: already done ({d})")
        self.done.append(
            {
                "name": stage.name,
                "dir": str(d),
                "train_tokens": int(summary["train_tokens"]),
                "reused": reused,
            }
        )
        return summary

    def _train(self, stage: Stage, d: Path, checked: Preflight) -> dict:
        self.log(f"[pipeline] stage {stage.name}: training in {d}")
        atomic_write_json(
            d / "stage.json", {"name": stage.name, "inputs": stage.inputs, "extras": stage.extras}
        )
        try:
            summary = run_training(stage.cfg, d, extras=stage.extras, checked=checked)
        except BaseException:  # failed before training wrote anything (e.g. reading the data): no folder
            remove_if_unused(d, unused=_UNUSED_STAGE_FILES)
            raise
        if not self.cfg.get("keep_checkpoints", False):
            drop_checkpoints(d, keep_weights=_weights_loaded_later(stage.cfg))
        return summary

    def check(self) -> None:
        """Fail before the first stage on what would fail a later one: the config, the data, and the
        method's own options, set up for the stage that runs them (inputs from earlier stages, such as
        Skill-It's graph or DoReMi's reference, are stood in for: they do not exist yet)."""
        validate_config(self.cfg)  # the method's pipeline options too (stage configs drop them)
        name = self.cfg.method.name
        m = len(self.cfg.groups.names)
        if name in ("doremi", "doge"):
            cfg, extras = self.proxy_cfg(name), {"reference_checkpoint": "(the reference stage)"}
        elif name == "skillit":
            cfg, extras = self.cfg, {"skills_graph": np.ones((m, m)).tolist()}
        elif name == "ado":  # the token prior is read from the data when the run starts
            cfg, extras = self.cfg, {"token_prior": np.full(m, 1.0 / m).tolist()}
        elif recipe_for(self.cfg) is learn_single:
            cfg, extras = self.cfg, {}
        else:  # sweeps and analyses: their stages are static runs the recipe configures
            cfg, extras = derive(self.cfg, "stratified", STRATIFIED), {}
        preflight(cfg, extras=extras, check_inputs=False)

    # -- what the recipes share ------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.cfg.groups.names)

    def stratified_run(self) -> tuple[dict, Path]:
        stage = Stage("run", derive(self.cfg, "stratified", STRATIFIED))
        return self.run(stage), stage.directory(self.results_dir)

    def sweep(self, points: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
        """Static runs on `points` (default: the grid-search cover). Stage names and configs depend only
        on the point and its index, so sweeps over the same mixtures share their runs."""
        from aioli_repro.mixing.simplex import grid_points

        if points is None:
            m = len(self.cfg.groups.names)
            pcfg = self.cfg.method.get("pipeline", {})
            n_runs = int(pcfg.get("n_runs", 10))
            points = grid_points(m, n_runs=n_runs, seed=int(pcfg.get("cover_seed", self.cfg.seed)))
        summaries = []
        for i, p in enumerate(points):
            stage = Stage(f"sweep{i}", derive(self.cfg, "sweep", static_mixer(p)))
            summaries.append(self.run(stage))
        return np.asarray(points), summaries

    def proxy_cfg(self, name: str) -> DictConfig:
        """The proxy stage: the method's mixer at the pipeline's proxy budget."""
        pcfg = self.cfg.method.get("pipeline", {})
        mixer = OmegaConf.to_container(self.cfg.method.mixer, resolve=True)
        return derive(
            self.cfg, name, mixer, max_steps=pcfg.get("proxy_steps"), batch_size=pcfg.get("proxy_batch_size")
        )


# -- recipes: learn a mixture, then (unless the learning produced the result) one final static run ------
@dataclass
class Learned:
    """What a method's learning phase produced.

    p: the learned static mixture (Table 3 trains its two full-length finals on it). result: a run that
    already is the method's Table 2 result (grid's best sweep run, Skill-It's online run, a one-run
    method's run), or None when the result is a final static run on p. inputs: the stage directories
    that final run consumes. info: extra keys for the pipeline summary.
    """

    p: np.ndarray | None
    result: dict | None = None
    inputs: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def learn_single(pipe: Pipeline) -> Learned:
    """Stratified, static and the Aioli arms: one run, which is the result."""
    return Learned(p=None, result=pipe.run(Stage("run", pipe.cfg)))


def learn_grid(pipe: Pipeline) -> Learned:
    from aioli_repro.mixing.simplex import select_best

    points, summaries = pipe.sweep()
    best, _ = select_best(points, _val_matrix(summaries, pipe.groups))
    pipe.log(f"[pipeline] grid: best sweep point {best}: {np.round(points[best], 3).tolist()}")
    p = points[best]
    return Learned(p=p, result=summaries[best], info={"learned_proportions": _named(p, pipe.groups)})


def learn_headroom(pipe: Pipeline) -> Learned:
    """The best static mixture on the fixed headroom grid (`mixing.simplex.headroom_points`), chosen by
    val avg ppl; every point's val and test losses are kept for the headroom table."""
    from aioli_repro.mixing.simplex import headroom_points, select_best

    groups = pipe.groups
    points, summaries = pipe.sweep(headroom_points(len(groups)))
    best, _ = select_best(points, _val_matrix(summaries, groups))
    rows = [
        {"p": _named(p, groups), "val_loss": s["val_loss"], "test_loss": s["test_loss"],
         "val/avg_ppl": s["val/avg_ppl"], "test/avg_ppl": s["test/avg_ppl"]}
        for p, s in zip(points, summaries)
    ]  # fmt: skip
    pipe.log(
        f"[pipeline] headroom: best of {len(points)} points by val: {np.round(points[best], 3).tolist()}"
    )
    info = {"learned_proportions": _named(points[best], groups), "headroom_grid": rows}
    return Learned(p=points[best], result=summaries[best], info=info)


def learn_dml(pipe: Pipeline) -> Learned:
    from aioli_repro.mixing.laws import fit_log_linear, minimize_on_simplex

    points, summaries = pipe.sweep()
    m = len(pipe.groups)
    if len(points) < m + 1:  # the paper: the law needs at least m + 1 runs
        pipe.log(
            f"[pipeline] dml: warning: {len(points)} sweep runs for {m} groups (< m + 1): the law is "
            f"under-determined and its optimum may extrapolate badly; raise hp.grid.n_runs"
        )
    val = _val_matrix(summaries, pipe.groups)  # fit on validation, never test
    pcfg = pipe.cfg.method.get("pipeline", {})
    seed = int(pipe.cfg.seed)
    law, info = fit_log_linear(
        points, val, seed=seed, n_restarts=int(pcfg.get("restarts", 8)), ridge=float(pcfg.get("ridge", 1e-8))
    )
    c, b, A = (np.asarray(x) for x in (law.c, law.b, law.A))

    def total(p: np.ndarray) -> float:
        return float(np.sum(c + b * np.exp(-(A @ p))))

    p = minimize_on_simplex(total, len(points[0]), seed=seed)
    pipe.log(f"[pipeline] dml: law fit R2={info.get('r2', float('nan')):.4f}; p* = {np.round(p, 3).tolist()}")
    inputs = [s["run_dir"] for s in summaries]
    return Learned(p=p, inputs=inputs, info={"learned_proportions": _named(p, pipe.groups), "law_fit": info})


def learn_skillit(pipe: Pipeline) -> Learned:
    """m one-hot graph runs -> the skills graph -> the online run, whose time-averaged mixture is p
    (Skill-It has no static output; the average is what DoReMi and DoGE report too)."""
    from aioli_repro.mixing.skillit import skills_graph_from_losses

    groups = pipe.groups
    m = len(groups)
    steps = int(pipe.cfg.method.get("pipeline", {}).get("graph_steps", pipe.cfg.train.max_steps))
    starts, ends, dirs = [], [], []
    for j in range(m):
        onehot = np.eye(m)[j]
        stage = Stage(f"graph{j}", derive(pipe.cfg, "skillit_graph", static_mixer(onehot), max_steps=steps))
        s = pipe.run(stage)
        starts.append(s["val_history"][0][1])  # val loss at step 0
        ends.append([s["val_loss"][g] for g in groups])
        dirs.append(s["run_dir"])
    graph = skills_graph_from_losses(np.asarray(starts), np.asarray(ends))
    pipe.log(f"[pipeline] skillit: skills graph {np.round(graph, 3).tolist()}")
    online = pipe.run(Stage("online", pipe.cfg, extras={"skills_graph": graph.tolist()}, inputs=dirs))
    p = time_average(trajectory_records(online), groups, int(pipe.cfg.train.max_steps))
    return Learned(p=p, result=online, info={"skills_graph": graph.tolist()})


def learn_doremi(pipe: Pipeline) -> Learned:
    _, ref_dir = pipe.stratified_run()
    ref_ckpt = str(ref_dir / "checkpoints" / "final.ckpt")
    proxy_cfg = pipe.proxy_cfg("doremi")
    proxy = pipe.run(Stage("proxy", proxy_cfg, {"reference_checkpoint": ref_ckpt}, [str(ref_dir)]))
    return _from_proxy(pipe, proxy, "doremi")


def learn_doge(pipe: Pipeline) -> Learned:
    return _from_proxy(pipe, pipe.run(Stage("proxy", pipe.proxy_cfg("doge"))), "doge")


def _from_proxy(pipe: Pipeline, proxy: dict, name: str) -> Learned:
    """A proxy run's average weights, renormalised."""
    learned = proxy.get("learned_proportions")
    if not learned:
        raise RuntimeError(f"{name} proxy at {proxy['run_dir']} recorded no learned proportions")
    p = np.asarray([learned[g] for g in pipe.groups], dtype=np.float64)
    p = p / p.sum()
    pipe.log(f"[pipeline] {name}: proxy weights {np.round(p, 3).tolist()}")
    return Learned(p=p, inputs=[proxy["run_dir"]], info={"learned_proportions": _named(p, pipe.groups)})


def learn_dynamic_law(pipe: Pipeline) -> Learned:
    """The paper's §4 check of the linear dynamic law L^{t+1} = L^t - A^t p^t: short static children
    branch from the stratified run's final weights with different mixtures p (a Dirichlet cover, at
    least m + 1), and A^t is fitted by least squares on their val losses before and after.
    Children start from the parent's weights with a fresh optimizer, at the parent's final
    learning rate, for `branch_fraction` of the run's steps (docs/deviations.md)."""
    from aioli_repro.mixing.laws import fit_linear_dynamic, r2_score
    from aioli_repro.mixing.simplex import grid_points

    cfg, groups = pipe.cfg, pipe.groups
    m = len(groups)
    pcfg = cfg.method.get("pipeline", {})
    n = int(pcfg.get("n_children") or m + 1)
    if n < m + 1:
        raise ConfigError(f"method.pipeline.n_children: needs at least m + 1 = {m + 1} children, got {n}")
    steps = max(1, round(float(pcfg.get("branch_fraction", 0.1)) * int(cfg.train.max_steps)))
    parent, parent_dir = pipe.stratified_run()
    init = {"init_checkpoint": str(parent_dir / "checkpoints" / "final.ckpt")}
    lr = float(cfg.train.min_lr)
    points = np.asarray(grid_points(m, n_runs=n, seed=int(pcfg.get("cover_seed", cfg.seed))))
    before, after = [], []
    for k, p in enumerate(points):
        child_cfg = derive(
            cfg, "branch", static_mixer(p), max_steps=steps, warmup_steps=0, lr=lr, min_lr=lr,
            val_every=steps, checkpoint_every=0,
        )  # fmt: skip
        s = pipe.run(Stage(f"branch{k}", child_cfg, extras=init, inputs=[str(parent_dir)]))
        step0 = [v for st, v in s["val_history"] if st == 0]
        before.append(step0[0] if step0 else [parent["val_loss"][g] for g in groups])
        after.append([s["val_loss"][g] for g in groups])
    L0, L1 = np.asarray(before), np.asarray(after)
    A, _, r2 = fit_linear_dynamic(points, L0, L1)
    pred = L0 - points @ A.T
    law = {
        "A": A.tolist(), "r2": float(r2), "r2_pooled": float(r2_score(L1, pred, multioutput="pooled")),
        "mse": float(np.mean((L1 - pred) ** 2)), "P": points.tolist(), "L_before": L0.tolist(),
        "L_after": L1.tolist(), "branch_steps": steps, "branch_from": str(parent_dir),
    }  # fmt: skip
    pipe.log(f"[pipeline] dynamic_law: R2={r2:.4f}, MSE={law['mse']:.3g}, {n} children x {steps} steps")
    return Learned(p=None, result=parent, info={"dynamic_law": law})


def time_average(records: list[dict], groups: list[str], max_steps: int) -> np.ndarray:
    """Step-weighted mean over [0, max_steps) of a mixture trajectory (`trajectory_records`)."""
    m = len(groups)
    if not records:
        return np.full(m, 1.0 / m)
    steps = np.asarray([r["step"] for r in records], dtype=np.float64)
    ps = np.asarray([[r["p"][g] for g in groups] for r in records], dtype=np.float64)
    ends = np.append(steps[1:], float(max_steps))
    w = np.clip(ends - steps, 0.0, None)
    p = ps[-1] if w.sum() <= 0 else (w[:, None] * ps).sum(axis=0) / w.sum()
    return p / p.sum()


def final_stage(cfg: DictConfig, name: str, learned: Learned) -> Stage:
    """The full-length static run on the learned mixture."""
    return Stage("final", derive(cfg, name, static_mixer(learned.p)), inputs=learned.inputs)


def _weights_loaded_later(cfg: DictConfig) -> bool:
    """Stages whose final weights are loaded later: stratified runs (DoReMi's reference, the dynamic law's
    parent) and MixMin's proxies (scored on the target by its recipe). A stage folder is shared, so this
    reads the stage's own config, never the current recipe: MixMin's label is safe because a folder's name
    starts with its stage's label (`stage.result_dir`), so only MixMin's proxies live in `mixmin_proxy-*`."""
    return cfg.method.mixer.get("_target_") == STRATIFIED["_target_"] or cfg.method.name == "mixmin_proxy"


def drop_checkpoints(run_dir: Path, keep_weights: bool) -> None:
    """A finished stage is never resumed: delete its `last.ckpt` (optimizer state included: about 2 GB at
    160M), and its weights-only `final.ckpt` unless a later stage loads it. Summary and metrics stay."""
    ckpt = Path(run_dir) / "checkpoints"
    (ckpt / "last.ckpt").unlink(missing_ok=True)
    if not keep_weights:
        (ckpt / "final.ckpt").unlink(missing_ok=True)


def _named(p: np.ndarray, groups: list[str]) -> dict[str, float]:
    return {g: float(v) for g, v in zip(groups, p)}


def _val_matrix(summaries: list[dict], groups: list[str]) -> np.ndarray:
    return np.asarray([[s["val_loss"][g] for g in groups] for s in summaries], dtype=np.float64)


def _lazy(module: str, fn: str) -> Callable[[Pipeline], Learned]:
    """A recipe that lives in its own module (which imports this one), imported when it runs."""

    def recipe(pipe: Pipeline) -> Learned:
        import importlib

        return getattr(importlib.import_module(f"aioli_repro.pipeline.{module}"), fn)(pipe)

    recipe.__name__ = fn
    return recipe


RECIPES: dict[str, Callable[[Pipeline], Learned]] = {
    **dict.fromkeys(
        ("stratified", "static", "aioli", "aioli_mult", "aioli_null", "aioli_static", "aioli_diagonal"),
        learn_single,
    ),
    "grid": learn_grid,
    "dml": learn_dml,
    "skillit": learn_skillit,
    "doremi": learn_doremi,
    "doge": learn_doge,
    "dynamic_law": learn_dynamic_law,
    "headroom": learn_headroom,
    # methods published after the paper (issue 26; docs/methods.md)
    "ado": _lazy("ado", "learn_ado"),
    "regmix": _lazy("regmix", "learn_regmix"),
    "regmix_linear": _lazy("regmix", "learn_regmix"),
    "olmix": _lazy("olmix", "learn_olmix"),
    "mixmin": _lazy("mixmin", "learn_mixmin"),
    "unimax": _lazy("unimax", "learn_unimax"),
}


# Mixers that need no stage before their one run: a labelled variant of them (a sensitivity arm such as
# `aioli_eta3x`, an oracle run) is a single run under its own name.
SINGLE_RUN_MIXERS = (
    "aioli_repro.mixing.aioli.Aioli",
    "aioli_repro.mixing.static.Static",
    "aioli_repro.mixing.ado.ADO",
)


def recipe_for(cfg: DictConfig) -> Callable[[Pipeline], Learned]:
    name = str(cfg.method.name)
    if name in RECIPES:
        return RECIPES[name]
    if str(cfg.method.get("mixer", {}).get("_target_", "")) in SINGLE_RUN_MIXERS:
        return learn_single
    raise ConfigError(
        f"method: unknown method {name!r}; allowed: {sorted(RECIPES)} or a variant of aioli / static"
    )


def run_method(
    cfg: DictConfig, results_dir: str | Path, log: Callable[[str], None] = print
) -> tuple[dict, Path]:
    """Run `cfg.method.name` end to end (learn, then its final run); write and return the pipeline
    summary and its path."""
    name = cfg.method.name
    recipe = recipe_for(cfg)
    pipe = Pipeline(cfg, results_dir, log)
    pipe.check()
    learned = recipe(pipe)
    final = learned.result if learned.result is not None else pipe.run(final_stage(cfg, name, learned))
    # the paper counts every grid-search sweep run as extra, though the winner doubles as the final run
    extra = 0 if name in ("grid", "headroom", "dynamic_law") else 1
    summary = pipeline_summary(final, learned.info, name, pipe.done, extra)
    out = result_dir(results_dir, cfg, "pipeline", stage_hash(cfg)) / "summary.json"
    write_pipeline_summary(cfg, summary, out)
    return summary, out


def pipeline_summary(final: dict, info: dict, method: str, done: list[dict], not_extra: int = 1) -> dict:
    """The final run's summary, the learning's extras, and the stages behind it (each counted once)."""
    stages = _unique(done)
    return {
        **final,
        **info,
        "method": method,
        "stages": done,
        "total_tokens": int(sum(s["train_tokens"] for s in stages)),
        "extra_runs": len(stages) - not_extra,
        "final_run_dir": final["run_dir"],
    }


def write_pipeline_summary(cfg: DictConfig, summary: dict, path: Path) -> None:
    """summary.json, then one small W&B run, so tables can be rebuilt from W&B logs alone."""
    from aioli_repro.training.pipeline_run_log import log_pipeline_run

    if not world.is_launch_zero():
        return  # DDP: rank 0 writes
    atomic_write_json(path, summary)
    wb = cfg.logger.wandb
    log_pipeline_run(summary, path.parent, mode=wb.mode, project=wb.project, entity=wb.entity)


def _unique(done: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in done:
        if s["dir"] not in seen:
            seen.add(s["dir"])
            out.append(s)
    return out
