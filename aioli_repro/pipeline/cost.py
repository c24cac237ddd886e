"""What a sweep costs before it runs: training runs, tokens, GPU-hours and disk, from the configs alone.

`reproduce ... --dry-run` prints it. Every training run is counted once, as the stage cache runs it once:
the stratified run is also DoReMi's reference, DML trains on grid search's sweep, Table 3's grid base run
is a Table 2 sweep run. The recipes (`pipeline.recipes`, `pipeline.restricted`) decide which runs a method
trains; `method_runs` mirrors them and `tests/test_cost.py` checks it against what a pipeline trained.

Estimates, not measurements:
- training FLOPs = 6 · parameters · tokens · passes, where passes counts a method's extra work per step
  (DoReMi: the reference's forward, 4/3; DoGE: one backward per group present plus the val gradient,
  (2m + 3) / 3); evaluation is left out (a few % at paper scale);
- GPU-hours at `SUSTAINED_FLOPS` (an assumption: about 35% of an A100's bf16 peak; measure your own);
- disk: the packed data cache (train + held-out tokens the groups need), the weights a later stage loads
  (final.ckpt of the stratified runs, fp32), and one resumable last.ckpt (weights + AdamW moments) per
  job running at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from aioli_repro.mixing.simplex import headroom_points

SUSTAINED_FLOPS = 1.1e14  # FLOP/s per GPU (bf16, A100-class, ~35% of peak): an assumption, not a measurement
_ONE_RUN = (
    "stratified", "static", "aioli", "aioli_mult", "aioli_null", "aioli_static", "aioli_diagonal", "ado",
)  # fmt: skip


@dataclass(frozen=True)
class TrainRun:
    """One training run of a sweep: `key` identifies it across pipelines (shared runs count once)."""

    key: tuple
    steps: int
    batch: int
    context: int
    params: int
    passes: float = 1.0

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.context

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens * self.passes


def model_parameters(model: DictConfig) -> int:
    """Decoder parameters (untied input and output embeddings, as Pythia): 12·L·d² + 2·V·d."""
    d, layers, vocab = int(model.d_model), int(model.n_layer), int(model.vocab_size)
    return 12 * layers * d * d + 2 * vocab * d


def method_runs(cfg: DictConfig, fraction: float = 1.0, final: bool = True) -> list[TrainRun]:
    """The training runs of `cfg`'s pipeline (Table 2), or with its learning runs shortened by `fraction`
    and without the final static run (Table 3's learning phase)."""
    name, t = str(cfg.method.name), cfg.train
    pipe = cfg.method.get("pipeline") or {}
    m, seed, setting = len(cfg.groups.names), int(cfg.seed), str(cfg.groups.key)
    base = {"steps": int(t.max_steps), "batch": int(t.batch_size), "context": int(t.context_length)}
    params = model_parameters(cfg.model)

    def run(kind: str, *detail: object, passes: float = 1.0, **over: int) -> TrainRun:
        shape = {**base, **over}
        shape["steps"] = max(1, round(shape["steps"] * (fraction if kind != "final" else 1.0)))
        key = (setting, seed, kind, *detail, shape["steps"], shape["batch"])
        return TrainRun(key, params=params, passes=passes, **shape)

    last = [run("final", name)] if final else []
    if name in ("grid", "dml"):
        n, cover = int(pipe.get("n_runs", 10)), pipe.get("cover_seed", seed)
        sweep = [run("sweep", n, cover, i) for i in range(n)]
        return sweep if name == "grid" else [*sweep, *last]
    if name == "headroom":
        return [run("headroom", i) for i in range(len(headroom_points(m)))]
    if name == "skillit":
        graph = int(pipe.get("graph_steps") or t.max_steps)
        return [*(run("graph", j, steps=graph) for j in range(m)), run("skillit", "online")]
    if name in ("doremi", "doge"):
        shape = {"steps": int(pipe.proxy_steps), "batch": int(pipe.proxy_batch_size)}
        passes = 4 / 3 if name == "doremi" else (2 * m + 3) / 3
        proxy = run(name, "proxy", passes=passes, **shape)
        return [run("stratified"), proxy, *last] if name == "doremi" else [proxy, *last]
    if name in ("regmix", "regmix_linear", "olmix"):  # one swarm, shared by the three
        n, steps, sseed = int(pipe.swarm_size), int(pipe.swarm_steps), pipe.get("swarm_seed", seed)
        return [*(run("swarm", sseed, i, steps=steps) for i in range(n)), *last]
    if name == "mixmin":
        return [*(run("mixmin_proxy", j, steps=int(pipe.proxy_steps)) for j in range(m)), *last]
    if (
        name == "unimax"
    ):  # an upper bound: uncapped, UniMax reuses the stratified run (data decides, not config)
        return last
    if name == "stratified":
        return [run("stratified")]
    if name not in _ONE_RUN:
        raise ValueError(f"method {name!r}: no cost model (pipeline.cost.method_runs)")
    return [run(name, "run")]


def table3_runs(cfg: DictConfig) -> list[TrainRun]:
    """Table 3 job: the base method's learning runs at `restricted.fraction`, then two full-length runs
    (the static base final and the +Aioli run)."""
    fraction = float(cfg.restricted.fraction)
    learn = method_runs(cfg, fraction=fraction, final=False)
    name, t, params = str(cfg.method.name), cfg.train, model_parameters(cfg.model)
    full = {"steps": int(t.max_steps), "batch": int(t.batch_size), "context": int(t.context_length)}
    finals = [
        TrainRun((str(cfg.groups.key), int(cfg.seed), "restricted", name, v), params=params, **full)
        for v in ("base", "aioli")
    ]
    return [*learn, *finals]


# SlimPajama's token shares by source (Soboleva et al. 2023); SlimPajama-6B samples the same shares
SLIMPAJAMA_6B_TOKENS = 6.0e9
SLIMPAJAMA_SHARES = {
    "commoncrawl": 0.522, "c4": 0.267, "github": 0.052, "book": 0.042, "arxiv": 0.046,
    "wikipedia": 0.038, "stackexchange": 0.033,
}  # fmt: skip


def data_tokens(cfgs: list[DictConfig]) -> int | None:
    """Tokens of SlimPajama-6B the sweep's groups hold (None for other data: the cache's manifest says)."""
    if any(str(c.data.get("label", "")) != "SlimPajama-6B" for c in cfgs):
        return None
    groups = {str(g) for c in cfgs for g in c.groups.names}
    return int(SLIMPAJAMA_6B_TOKENS * sum(SLIMPAJAMA_SHARES.get(g, 0.0) for g in groups))


@dataclass
class SweepCost:
    runs: int
    tokens: int
    flops: float
    data_gb: float | None  # the packed cache (2 bytes a token)
    weights_gb: float  # final.ckpt kept for later stages
    per_job_gb: float  # one resumable last.ckpt while a job runs

    @property
    def gpu_hours(self) -> float:
        return self.flops / SUSTAINED_FLOPS / 3600

    def line(self) -> str:
        data = "?" if self.data_gb is None else _num(self.data_gb)
        return (
            f"[reproduce] cost (estimate, aioli_repro/pipeline/cost.py): {self.runs} training runs, "
            f"{self.tokens / 1e9:,.2f}B tokens, {self.flops:.2e} FLOPs = {_num(self.gpu_hours)} GPU-hours at "
            f"{SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s sustained; disk: data cache {data} GB + kept weights "
            f"{_num(self.weights_gb)} GB + {_num(self.per_job_gb)} GB per job running at once"
        )


def _num(x: float) -> str:
    """Whole numbers from 10 up, two significant digits below (a CPU miniature's fractions of an hour)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def sweep_cost(table: str, cfgs: list[DictConfig]) -> SweepCost:
    """The distinct training runs of the jobs whose configs are `cfgs`, and what they need."""
    runs: dict[tuple, TrainRun] = {}
    for cfg in cfgs:
        for r in table3_runs(cfg) if table == "table3" else method_runs(cfg):
            runs.setdefault(r.key, r)
    params = max((r.params for r in runs.values()), default=0)
    kept = sum(1 for k in runs if k[2] == "stratified")  # final.ckpt: DoReMi's reference
    tokens = data_tokens(cfgs)
    return SweepCost(
        runs=len(runs),
        tokens=sum(r.tokens for r in runs.values()),
        flops=sum(r.flops for r in runs.values()),
        data_gb=None if tokens is None else 2 * tokens / 1e9,
        weights_gb=4 * params * kept / 1e9,
        per_job_gb=12 * params / 1e9,
    )
