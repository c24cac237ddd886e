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
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from aioli_repro.fileio import atomic_write_json
from aioli_repro.pipeline.stage import Stage, read_summary, result_dir, stage_hash, stage_lock
from aioli_repro.train import UNUSED_RUN_FILES, Preflight, preflight, remove_if_unused, run_training


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
            return run_training(stage.cfg, d, extras=stage.extras, checked=checked)
        except BaseException:  # failed before training wrote anything (e.g. reading the data): no folder
            remove_if_unused(d, unused=_UNUSED_STAGE_FILES)
            raise

    def check(self) -> None:
        """Fail before the first stage on what would fail a later one: the config, the data, and the
        method's own options, set up for the stage that runs them (inputs from earlier stages, such as
        Skill-It's graph or DoReMi's reference, are stood in for: they do not exist yet)."""
        name = self.cfg.method.name
        m = len(self.cfg.groups.names)
        if name in ("doremi", "doge"):
            cfg, extras = self._proxy_cfg(name), {"reference_checkpoint": "(the reference stage)"}
        elif name == "skillit":
            cfg, extras = self.cfg, {"skills_graph": np.ones((m, m)).tolist()}
        elif RECIPES.get(name) is Pipeline.single:
            cfg, extras = self.cfg, {}
        else:  # sweeps and analyses: their stages are static runs the recipe configures
            cfg, extras = derive(self.cfg, "stratified", STRATIFIED), {}
        preflight(cfg, extras=extras, check_inputs=False)

    # -- recipes --------------------------------------------------------------------------------
    def single(self) -> dict:
        return self.run(Stage("run", self.cfg))

    def stratified_run(self) -> tuple[dict, Path]:
        stage = Stage("run", derive(self.cfg, "stratified", STRATIFIED))
        return self.run(stage), stage.directory(self.results_dir)

    def sweep(self, points: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
        """Static runs on `points` (default: the grid-search cover). Stage names and configs depend only
        on the point and its index, so sweeps over the same mixtures share their runs."""
        from aioli_repro.simplex import grid_points

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

    def grid(self) -> dict:
        from aioli_repro.simplex import select_best

        points, summaries = self.sweep()
        val = _val_matrix(summaries, self.cfg.groups.names)
        best, _ = select_best(points, val)
        self.log(f"[pipeline] grid: best sweep point {best}: {np.round(points[best], 3).tolist()}")
        return {**summaries[best], "learned_proportions": _named(points[best], self.cfg.groups.names)}

    def headroom(self) -> dict:
        """The best static mixture on the fixed headroom grid (`simplex.headroom_points`), chosen by val
        avg ppl; every point's val and test losses are kept for the headroom table."""
        from aioli_repro.simplex import headroom_points, select_best

        groups = list(self.cfg.groups.names)
        points, summaries = self.sweep(headroom_points(len(groups)))
        best, _ = select_best(points, _val_matrix(summaries, groups))
        rows = [
            {"p": _named(p, groups), "val_loss": s["val_loss"], "test_loss": s["test_loss"],
             "val/avg_ppl": s["val/avg_ppl"], "test/avg_ppl": s["test/avg_ppl"]}
            for p, s in zip(points, summaries)
        ]  # fmt: skip
        self.log(
            f"[pipeline] headroom: best of {len(points)} points by val: {np.round(points[best], 3).tolist()}"
        )
        return {**summaries[best], "learned_proportions": _named(points[best], groups), "headroom_grid": rows}

    def dml(self) -> dict:
        from aioli_repro.laws import fit_log_linear, minimize_on_simplex

        points, summaries = self.sweep()
        m = len(self.cfg.groups.names)
        if len(points) < m + 1:  # the paper: the law needs at least m + 1 runs
            self.log(
                f"[pipeline] dml: warning: {len(points)} sweep runs for {m} groups (< m + 1): the law is "
                f"under-determined and its optimum may extrapolate badly; raise hp.grid.n_runs"
            )
        val = _val_matrix(summaries, self.cfg.groups.names)  # fit on validation, never test
        pcfg = self.cfg.method.get("pipeline", {})
        law, info = fit_log_linear(
            points,
            val,
            seed=int(self.cfg.seed),
            n_restarts=int(pcfg.get("restarts", 8)),
            ridge=float(pcfg.get("ridge", 1e-8)),
        )
        c, b, A = (np.asarray(x) for x in (law.c, law.b, law.A))

        def total(p: np.ndarray) -> float:
            return float(np.sum(c + b * np.exp(-(A @ p))))

        p = minimize_on_simplex(total, len(points[0]), seed=int(self.cfg.seed))
        self.log(
            f"[pipeline] dml: law fit R2={info.get('r2', float('nan')):.4f}; p* = {np.round(p, 3).tolist()}"
        )
        summary = self.run(
            Stage("final", derive(self.cfg, "dml", static_mixer(p)), inputs=[s["run_dir"] for s in summaries])
        )
        return {**summary, "learned_proportions": _named(p, self.cfg.groups.names), "law_fit": info}

    def skillit(self) -> dict:
        from aioli_repro.mixing.skillit import skills_graph_from_losses

        groups = list(self.cfg.groups.names)
        m = len(groups)
        steps = int(self.cfg.method.get("pipeline", {}).get("graph_steps", self.cfg.train.max_steps))
        starts, ends, dirs = [], [], []
        for j in range(m):
            onehot = np.eye(m)[j]
            stage = Stage(
                f"graph{j}", derive(self.cfg, "skillit_graph", static_mixer(onehot), max_steps=steps)
            )
            s = self.run(stage)
            starts.append(s["val_history"][0][1])  # val loss at step 0
            ends.append([s["val_loss"][g] for g in groups])
            dirs.append(s["run_dir"])
        graph = skills_graph_from_losses(np.asarray(starts), np.asarray(ends))
        self.log(f"[pipeline] skillit: skills graph {np.round(graph, 3).tolist()}")
        extras = {"skills_graph": graph.tolist()}
        summary = self.run(Stage("online", self.cfg, extras=extras, inputs=dirs))
        return {**summary, "skills_graph": graph.tolist()}

    def doremi(self) -> dict:
        _, ref_dir = self.stratified_run()
        ref_ckpt = str(ref_dir / "checkpoints" / "final.ckpt")
        proxy_stage = Stage(
            "proxy", self._proxy_cfg("doremi"), {"reference_checkpoint": ref_ckpt}, [str(ref_dir)]
        )
        proxy = self.run(proxy_stage)
        return self._final_from_proxy(proxy, "doremi")

    def doge(self) -> dict:
        proxy = self.run(Stage("proxy", self._proxy_cfg("doge")))
        return self._final_from_proxy(proxy, "doge")

    def dynamic_law(self) -> dict:
        """The paper's §4 check of the linear dynamic law L^{t+1} = L^t - A^t p^t: short static children
        branch from the stratified run's final weights with different mixtures p (a Dirichlet cover, at
        least m + 1), and A^t is fitted by least squares on their val losses before and after.
        Children start from the parent's weights with a fresh optimizer, at the parent's final
        learning rate, for `branch_fraction` of the run's steps (docs/deviations.md)."""
        from aioli_repro.laws import fit_linear_dynamic, r2_score
        from aioli_repro.simplex import grid_points

        groups = list(self.cfg.groups.names)
        m = len(groups)
        pcfg = self.cfg.method.get("pipeline", {})
        n = int(pcfg.get("n_children") or m + 1)
        if n < m + 1:
            raise ValueError(f"method.pipeline.n_children: needs at least m + 1 = {m + 1} children, got {n}")
        steps = max(1, round(float(pcfg.get("branch_fraction", 0.1)) * int(self.cfg.train.max_steps)))
        parent, parent_dir = self.stratified_run()
        init = {"init_checkpoint": str(parent_dir / "checkpoints" / "final.ckpt")}
        lr = float(self.cfg.train.min_lr)
        points = np.asarray(grid_points(m, n_runs=n, seed=int(pcfg.get("cover_seed", self.cfg.seed))))
        before, after = [], []
        for k, p in enumerate(points):
            child_cfg = derive(
                self.cfg, "branch", static_mixer(p), max_steps=steps, warmup_steps=0, lr=lr, min_lr=lr,
                val_every=steps, checkpoint_every=0,
            )  # fmt: skip
            s = self.run(Stage(f"branch{k}", child_cfg, extras=init, inputs=[str(parent_dir)]))
            step0 = [v for st, v in s["val_history"] if st == 0]
            before.append(step0[0] if step0 else [parent["val_loss"][g] for g in groups])
            after.append([s["val_loss"][g] for g in groups])
        L0, L1 = np.asarray(before), np.asarray(after)
        A, _, r2 = fit_linear_dynamic(points, L0, L1)
        pred = L0 - points @ A.T
        law = {
            "A": A.tolist(),
            "r2": float(r2),
            "r2_pooled": float(r2_score(L1, pred, multioutput="pooled")),
            "mse": float(np.mean((L1 - pred) ** 2)),
            "P": points.tolist(),
            "L_before": L0.tolist(),
            "L_after": L1.tolist(),
            "branch_steps": steps,
            "branch_from": str(parent_dir),
        }
        self.log(f"[pipeline] dynamic_law: R2={r2:.4f}, MSE={law['mse']:.3g}, {n} children x {steps} steps")
        return {**parent, "dynamic_law": law}

    def _proxy_cfg(self, name: str) -> DictConfig:
        """The proxy stage: the method's mixer at the pipeline's proxy budget."""
        pcfg = self.cfg.method.get("pipeline", {})
        mixer = OmegaConf.to_container(self.cfg.method.mixer, resolve=True)
        return derive(
            self.cfg, name, mixer, max_steps=pcfg.get("proxy_steps"), batch_size=pcfg.get("proxy_batch_size")
        )

    def _final_from_proxy(self, proxy: dict, name: str) -> dict:
        learned = proxy.get("learned_proportions")
        if not learned:
            raise RuntimeError(f"{name} proxy at {proxy['run_dir']} recorded no learned proportions")
        p = np.asarray([learned[g] for g in self.cfg.groups.names], dtype=np.float64)
        p = p / p.sum()
        self.log(f"[pipeline] {name}: proxy weights {np.round(p, 3).tolist()}")
        summary = self.run(Stage("final", derive(self.cfg, name, static_mixer(p)), inputs=[proxy["run_dir"]]))
        return {**summary, "learned_proportions": _named(p, self.cfg.groups.names)}


def _named(p: np.ndarray, groups: list[str]) -> dict[str, float]:
    return {g: float(v) for g, v in zip(groups, p)}


def _val_matrix(summaries: list[dict], groups: list[str]) -> np.ndarray:
    return np.asarray([[s["val_loss"][g] for g in groups] for s in summaries], dtype=np.float64)


RECIPES = {
    "stratified": Pipeline.single,
    "static": Pipeline.single,
    "aioli": Pipeline.single,
    "aioli_mult": Pipeline.single,
    "aioli_null": Pipeline.single,
    "aioli_static": Pipeline.single,
    "aioli_diagonal": Pipeline.single,
    "grid": Pipeline.grid,
    "dml": Pipeline.dml,
    "skillit": Pipeline.skillit,
    "doremi": Pipeline.doremi,
    "doge": Pipeline.doge,
    "dynamic_law": Pipeline.dynamic_law,
    "headroom": Pipeline.headroom,
}


def run_method(
    cfg: DictConfig, results_dir: str | Path, log: Callable[[str], None] = print
) -> tuple[dict, Path]:
    """Run `cfg.method.name` end to end; write and return the pipeline summary and its path."""
    name = cfg.method.name
    if name not in RECIPES:
        raise ValueError(f"method: unknown method {name!r}; allowed: {sorted(RECIPES)}")
    pipe = Pipeline(cfg, results_dir, log)
    pipe.check()
    final = RECIPES[name](pipe)
    summary = {
        **final,
        "method": name,
        "stages": pipe.done,
        "total_tokens": int(sum(s["train_tokens"] for s in _unique(pipe.done))),
        # the paper counts every grid-search sweep run as extra, though the winner doubles as the final run
        "extra_runs": len(_unique(pipe.done)) - (0 if name in ("grid", "headroom", "dynamic_law") else 1),
        "final_run_dir": final["run_dir"],
    }
    out = result_dir(results_dir, cfg, "pipeline", stage_hash(cfg)) / "summary.json"
    atomic_write_json(out, summary)
    # one small W&B run per pipeline, so tables can be rebuilt from W&B logs alone
    from aioli_repro.results import log_pipeline_run

    wb = cfg.logger.wandb
    log_pipeline_run(summary, out.parent, mode=wb.mode, project=wb.project, entity=wb.entity)
    return summary, out


def _unique(done: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in done:
        if s["dir"] not in seen:
            seen.add(s["dir"])
            out.append(s)
    return out
