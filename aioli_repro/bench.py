"""Throughput benchmark: `python -m aioli_repro.bench [--scale tiny] [--steps 60] [--methods a,b]`.

Every comparison is a ratio of two timings taken in the same process, one after the other, on the
same model config and batches, so machine noise mostly cancels. Writes `results/bench.json` and
appends a row to `docs/benchmarks.md`.

Reported:
- tokens_per_s of our Lightning training step, and its split into data / forward / backward /
  optimizer / mixing (an instrumented loop over the same components);
- lightning_vs_plain: our Lightning step time / a plain PyTorch loop's (framework overhead), the median
  over `--pairs` alternating runs (each pair's ratio is in lightning_vs_plain_pairs);
- ours_vs_hf: our decoder's forward+backward time / HF GPTNeoXForCausalLM's on the same config;
- <method>_vs_stratified: wall-clock of each online method / stratified for the same steps, and
  <method>_eval_share: the part of that method's wall-clock spent in its own validation passes
  (Aioli's LearnParams evaluations);
- sampler_vs_step: the sampler's tokens/s / the training step's tokens/s;
- swarm_speedup: wall-clock of a RegMix/Olmix proxy swarm trained one proxy at a time / the same swarm
  in `swarm_jobs` worker processes (several small runs at once on the CPU cores or on one GPU);
- mfu (GPU only): (6N + attention) FLOPs per token × tokens/s / the device's peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from aioli_repro.config import compose_train
from aioli_repro.data.datamodule import MixtureDataModule
from aioli_repro.fileio import atomic_write_json
from aioli_repro.mixing.static import Stratified
from aioli_repro.model import build_model, lm_token_losses
from aioli_repro.timed_parts import CUT, FAILED, OK, Part, PartOutput, PartResult, PartSpec, run_parts
from aioli_repro.training.callbacks import MixingCallback
from aioli_repro.training.clipping import clip_gradients_
from aioli_repro.training.device_settings import apply_process_settings, resolve_device_settings
from aioli_repro.training.module import MixingLM, OptimConfig, lr_at, param_groups

# a Trainer that only trains: no logger, checkpoints, progress bar, summary or validation loop
QUIET_TRAINER = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "RTX 6000 Ada": 364e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_flops(name: str) -> float | None:
    for key, v in PEAK_BF16.items():
        if key in name:
            return v
    return None


def _cfg(overrides: list[str]) -> DictConfig:
    return compose_train(overrides)


class _StepTimer(L.Callback):
    """Wall time between consecutive train-batch ends (one full Lightning step each)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def _make_dm(cfg: DictConfig, packed: object) -> MixtureDataModule:
    return MixtureDataModule(packed, batch_size=cfg.train.batch_size, seed=0, val_max_seqs=8, test_max_seqs=8)


def bench_lightning(cfg: DictConfig, packed: object, steps: int, device: torch.device) -> list[float]:
    settings = resolve_device_settings(cfg)
    torch.manual_seed(0)
    module = MixingLM(
        instantiate(cfg.model),
        list(cfg.groups.names),
        max_steps=steps,
        optim=_optim(cfg),
        log_every=cfg.train.log_every,
        settings=settings,
    )
    timer = _StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=device.type,
        devices=1,
        precision=settings.precision,
        callbacks=[MixingCallback(Stratified()), timer],
        log_every_n_steps=cfg.train.log_every,
        gradient_clip_val=float(cfg.train.grad_clip),
        **QUIET_TRAINER,
    )
    trainer.fit(module, datamodule=_make_dm(cfg, packed))
    return timer.times


def _optim(cfg: DictConfig) -> OptimConfig:
    t = cfg.train
    return OptimConfig(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps)


def bench_plain(
    cfg: DictConfig, packed: object, steps: int, device: torch.device
) -> tuple[list[float], dict]:
    """A plain loop over the same components, instrumented per phase (syncs only for timing)."""
    settings = resolve_device_settings(cfg)  # the Lightning run's precision, fused AdamW and compile
    torch.manual_seed(0)
    model = build_model(instantiate(cfg.model)).to(device)
    if settings.compile:
        model = torch.compile(model)
    o = _optim(cfg)
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, eps=o.eps, fused=settings.fused_adamw
    )
    scaler = torch.amp.GradScaler(device.type) if settings.grad_scaler else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, steps) / o.lr)
    dm = _make_dm(cfg, packed)
    method = Stratified()
    from aioli_repro.mixing.base import MixingContext

    method.setup(MixingContext(list(cfg.groups.names), steps, cfg.train.batch_size, 0))
    phases = {k: [] for k in ("data", "forward", "backward", "optimizer", "mixing")}
    times = []
    autocast = settings.autocast_dtype
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = dm.draw_batch(pin=device.type == "cuda")  # the Lightning run's data path, hook included
        tokens = dm.transfer_batch_to_device(batch, device, 0).tokens
        _sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = lm_token_losses(model, tokens).float().mean()
        _sync(device)
        t2 = time.perf_counter()
        (scaler.scale(loss) if scaler else loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        clip_gradients_(opt, cfg.train.grad_clip, "norm", scaler)  # the clipping MixingLM does
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        dm.sampler.set_proportions(method.proportions(), method.composition())
        t5 = time.perf_counter()
        for k, a, b in (
            ("data", t0, t1),
            ("forward", t1, t2),
            ("backward", t2, t3),
            ("optimizer", t3, t4),
            ("mixing", t4, t5),
        ):
            phases[k].append(b - a)
        times.append(t5 - t0)
    return times, phases


def bench_hf(cfg: DictConfig, steps: int, device: torch.device) -> float | None:
    """Median forward+backward time of HF GPTNeoXForCausalLM / ours on the same config and batch."""
    try:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except ImportError:
        return None
    mc = instantiate(cfg.model)
    hf_cfg = GPTNeoXConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.d_model,
        num_hidden_layers=mc.n_layer,
        num_attention_heads=mc.n_head,
        intermediate_size=mc.d_ff or 4 * mc.d_model,
        rotary_pct=mc.rotary_pct,
        rotary_emb_base=mc.rotary_base,
        max_position_embeddings=mc.context_length,
        use_parallel_residual=True,
        hidden_act="gelu",
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        layer_norm_eps=mc.layer_norm_eps,
    )
    hf_cfg._attn_implementation = "sdpa"
    ours = build_model(mc).to(device)
    hf = GPTNeoXForCausalLM(hf_cfg).to(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, mc.vocab_size, (cfg.train.batch_size, cfg.train.context_length), generator=g
    ).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def run_ours() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = lm_token_losses(ours, tokens).float().mean()
        loss.backward()

    def run_hf() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()

    t_ours, t_hf = [], []
    for i in range(steps):  # interleaved so drift hits both equally
        for fn, acc in ((run_ours, t_ours), (run_hf, t_hf)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= 2:
                acc.append(time.perf_counter() - t0)
    return statistics.median(t_ours) / statistics.median(t_hf)


def method_fit(base: list[str], steps: int, method: str, run_dir: Path, reference: str | None) -> dict:
    """Train `steps` steps of `method` (no periodic checkpoints): its fit time and own evaluation share."""
    from aioli_repro.training.run import run_training

    extra = ["train.checkpoint_every=0"]
    if method == "aioli":  # two rounds in the benchmark's step budget, the hp's LearnParams share
        extra.append(f"hp.aioli.update_steps={steps // 2}")
    cfg = _cfg([*base, f"method={method}", f"train.max_steps={steps}", *extra])
    extras = {"reference_checkpoint": reference} if method == "doremi" else None
    s = run_training(cfg, run_dir, extras=extras)
    out = {"fit_s": s["fit_s"], "steps": s["steps"]}
    if s.get("method_evals"):  # the method's own validation passes (Aioli: LearnParams)
        out.update(eval_share=s["method_eval_s"] / s["fit_s"], evals=s["method_evals"])
    return out


def bench_swarm(base: list[str], n: int, steps: int, jobs: int, work: Path) -> dict:
    """One swarm of `n` proxies of `steps` steps, trained serially and then in `jobs` worker processes
    (fresh results folders, so nothing is reused): both wall-clocks and their ratio."""
    from aioli_repro.pipeline.recipes import Pipeline
    from aioli_repro.pipeline.swarm import run_swarm

    times = {}
    over = [*base, "method=regmix", f"hp.regmix.swarm_size={n}", f"hp.regmix.swarm_steps={steps}"]
    for k in (1, jobs):
        cfg = _cfg([*over, f"hp.regmix.swarm_jobs={k}", "train.checkpoint_every=0"])
        t0 = time.perf_counter()
        run_swarm(Pipeline(cfg, work / f"swarm_jobs{k}", log=lambda msg: None))
        times[k] = time.perf_counter() - t0
    return {"swarm_serial_s": times[1], "swarm_parallel_s": times[jobs], "swarm_jobs": jobs,
            "swarm_proxies": n, "swarm_speedup": times[1] / times[jobs]}  # fmt: skip


def default_swarm_jobs(device: torch.device) -> int:
    """Proxies at once: one per CPU core (at most 8), or 4 sharing one GPU."""
    if device.type == "cuda":
        return 4
    from aioli_repro.pipeline.launch import cpu_cores

    return max(2, min(cpu_cores(), 8))


def bench_sampler(cfg: DictConfig, packed: object, n: int = 2000) -> float:
    dm = _make_dm(cfg, packed)
    dm.sampler.set_proportions(np.full(len(cfg.groups.names), 1.0 / len(cfg.groups.names)))
    t0 = time.perf_counter()
    for _ in range(n):
        dm.draw_batch()
    dt = time.perf_counter() - t0
    return n * cfg.train.batch_size * cfg.train.context_length / dt


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--model", default=None, help="model config name (default: the scale's)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--method-steps", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=3, help="alternating plain/Lightning runs")
    ap.add_argument("--methods", default="aioli,doge,doremi", help="comma list, or '' to skip")
    ap.add_argument("--data", default=None, help="data config (default: the scale's)")
    ap.add_argument("--swarm-proxies", type=int, default=8, help="proxies in the swarm part (0: skip it)")
    ap.add_argument("--swarm-steps", type=int, default=100)
    ap.add_argument("--swarm-jobs", type=int, default=0, help="worker processes (0: cores, or 4 on a GPU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--part-limit-s", type=float, default=900.0, help="time limit of each part (seconds)")
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument(
        "--md", default="docs/benchmarks.md", help="Markdown table to append a row to ('' : none)"
    )
    # the child side of one part (aioli_repro/timed_parts.py)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    return ap


def _base_overrides(args: argparse.Namespace) -> list[str]:
    base = [f"scale={args.scale}", "logger=none", "progress=false"]
    base += [f"model={args.model}"] if args.model else []
    base += [f"data={args.data}"] if args.data else []
    return base + (["train.compile=true"] if args.compile else [])


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The user's options, which every part's process gets too (the report's own are left out)."""
    keep = ["--scale", args.scale, "--steps", str(args.steps), "--method-steps", str(args.method_steps)]
    keep += ["--pairs", str(args.pairs)] + (["--model", args.model] if args.model else [])
    keep += ["--swarm-proxies", str(args.swarm_proxies), "--swarm-steps", str(args.swarm_steps)]
    keep += ["--swarm-jobs", str(args.swarm_jobs)]
    return keep + (["--data", args.data] if args.data else []) + (["--compile"] if args.compile else [])


def _parts(args: argparse.Namespace, work: Path) -> list[PartSpec]:
    """step (Lightning vs plain, memory, MFU), hf, sampler, swarm, then stratified and each method."""
    common, lim = [*_passthrough(args), "--work-dir", str(work)], args.part_limit_s
    names = ("step", "hf", "sampler") + (("swarm",) if args.swarm_proxies > 0 else ())
    parts: list[PartSpec] = [Part(n, lim, common) for n in names]
    methods = [m for m in args.methods.split(",") if m and m != "skillit"]  # Skill-It needs a graph run
    if methods:
        parts.append(Part("method:stratified", lim, common))
    for m in methods:
        parts.append(
            lambda done, m=m: Part(f"method:{m}", lim, common) if _ok(done, "method:stratified") else None
        )
    return parts


def _ok(done: dict[str, PartResult], name: str) -> bool:
    return name in done and done[name].status == OK


def main(argv: list[str] | None = None) -> dict:
    """Every benchmark of the module docstring on this machine, each part in its own process with its
    own time limit; --out is rewritten after every part (cut parts listed), --md gets a row at the end."""
    args = _parser().parse_args(argv)
    if args.part:
        _child(args)
        return {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": _device_name(default_device()), "parts": {}, "cut": [], "failed": []}

    def record(r: PartResult) -> None:
        _merge(result, r)
        atomic_write_json(out, result)

    with tempfile.TemporaryDirectory(dir=out.parent) as work:  # the parts' files and runs
        run_parts("aioli_repro.bench", _parts(args, Path(work)), Path(work), record)
    if args.md:
        _append_markdown(Path(args.md), result)
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=2))
    return result


def _merge(result: dict, r: PartResult) -> None:
    """One part's figures into the flat result, with the ratios that need two parts."""
    result["parts"][r.name] = {"status": r.status, "seconds": round(r.seconds, 1), "limit_s": r.limit_s}
    if r.status == CUT:
        result["cut"].append(r.name)
    elif r.status == FAILED:
        result["failed"].append(r.name)
        result["parts"][r.name]["error"] = r.error
    f = r.figures
    if r.name in ("step", "hf", "swarm"):
        result.update(f)
    elif r.name == "sampler" and "sampler_tokens_per_s" in f:
        result["sampler_tokens_per_s"] = f["sampler_tokens_per_s"]
    elif r.name.startswith("method:") and "fit_s" in f:
        m = r.name.split(":", 1)[1]
        result[f"{m}_fit_s"] = f["fit_s"]
        if m != "stratified" and result.get("stratified_fit_s"):
            result[f"{m}_vs_stratified"] = f["fit_s"] / result["stratified_fit_s"]
        if "eval_share" in f:
            result[f"{m}_eval_share"], result[f"{m}_evals"] = f["eval_share"], f["evals"]
    for key in ("tokens_per_s", "lightning_vs_plain", "ours_vs_hf", "mfu", "step_ms", "batch_size"):
        result.setdefault(key, None)
    if result.get("sampler_tokens_per_s") and result.get("tokens_per_s"):
        result["sampler_vs_step"] = result["sampler_tokens_per_s"] / result["tokens_per_s"]
    for m in ("aioli", "doge", "doremi"):
        result.setdefault(f"{m}_vs_stratified", None)
    result.setdefault("sampler_vs_step", None)
    result.setdefault("swarm_speedup", None)


def default_device() -> torch.device:
    """The device a run trains on here: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _child(args: argparse.Namespace) -> None:
    """One part, in its own process: its figures go to --part-out as each is measured."""
    from aioli_repro.training.preflight import build_data

    out, device = PartOutput(args.part_out), default_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    base = _base_overrides(args)
    cfg = _cfg(base)
    apply_process_settings(resolve_device_settings(cfg))  # TF32 as a training run sets it
    _, packed = build_data(cfg)
    if args.part == "step":
        t, name = cfg.train, _device_name(device)
        print(f"[bench] device: {name}; model {cfg.model}; batch {t.batch_size} x {t.context_length}")
        step_throughput(cfg, packed, args.steps, args.pairs, device, out)
        out.put(**memory_and_mfu(cfg, out.figures["tokens_per_s"], device, name))
    elif args.part == "hf":
        out.put(ours_vs_hf=bench_hf(cfg, max(6, args.steps // 5), device))
    elif args.part == "sampler":
        out.put(sampler_tokens_per_s=bench_sampler(cfg, packed))
    elif args.part == "swarm":
        jobs = args.swarm_jobs or default_swarm_jobs(device)
        out.put(**bench_swarm(base, args.swarm_proxies, args.swarm_steps, jobs, Path(args.work_dir)))
    elif args.part.startswith("method:"):
        m = args.part.split(":", 1)[1]
        ref = str(Path(args.work_dir) / "stratified" / "checkpoints" / "final.ckpt")
        out.put(**method_fit(base, args.method_steps, m, Path(args.work_dir) / m, ref))
    else:
        raise SystemExit(f"bench: unknown part {args.part!r}")


def step_throughput(
    cfg: DictConfig, packed: object, steps: int, n_pairs: int, device: torch.device, out: PartOutput
) -> None:
    """Our Lightning step against a plain PyTorch loop, per phase; figures to `out` after every pair.

    Plain and Lightning runs alternate and the median of the per-pair ratios is kept: on a shared or
    throttling machine a single plain/Lightning/plain bracket swings by +-10% (measured)."""
    warm = max(3, steps // 10)
    pairs, light_all, plain_all, phases = [], [], [], None
    tokens_per_step = cfg.train.batch_size * cfg.train.context_length
    out.put(
        model={k: v for k, v in dict(cfg.model).items() if k != "_target_"},
        batch_size=cfg.train.batch_size,
        context_length=cfg.train.context_length,
        steps=steps,
        compile=resolve_device_settings(cfg).compile,
    )
    for _ in range(max(1, n_pairs)):
        plain_times, ph = bench_plain(cfg, packed, steps, device)
        light_times = bench_lightning(cfg, packed, steps, device)
        phases = phases or ph
        p_med, l_med = statistics.median(plain_times[warm:]), statistics.median(light_times[warm:])
        pairs.append(l_med / p_med)
        plain_all += plain_times[warm:]
        light_all += light_times[warm:]
        plain_med, light_med = statistics.median(plain_all), statistics.median(light_all)
        out.put(
            tokens_per_s=tokens_per_step / light_med,
            plain_tokens_per_s=tokens_per_step / plain_med,
            step_ms=light_med * 1e3,
            lightning_vs_plain=statistics.median(pairs),
            lightning_vs_plain_pairs=pairs,
            phase_ms={k: 1e3 * statistics.median(v[warm:]) for k, v in phases.items()},
        )


def memory_and_mfu(cfg: DictConfig, tokens_per_s: float, device: torch.device, name: str) -> dict:
    """GPU: model FLOP utilisation and peak memory; CPU: peak resident memory (no MFU).

    MFU = (6 N + 12 L d T) FLOPs per token (model.flops_per_token: N without the input embedding, a
    lookup) x tokens/s / the device's peak dense bf16 FLOP/s (PEAK_BF16)."""
    if device.type != "cuda":
        import resource

        return {"mfu": None, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    model = build_model(instantiate(cfg.model))
    peak = _peak_flops(name)
    mfu = model.flops_per_token(cfg.train.context_length) * tokens_per_s / peak if peak else None
    return {"mfu": mfu, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def _fmt(v: object, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _swarm_cell(r: dict) -> str:
    if r.get("swarm_speedup") is None:
        return "—"
    return f"{r['swarm_speedup']:.2f}× ({r['swarm_proxies']} proxies, {r['swarm_jobs']} jobs)"


def _append_markdown(path: Path, r: dict) -> None:
    """Add a row to the file's results table: under the last row of the table with this header (the
    prose after it stays below), or in a new table at the end when the file has no such table."""
    header = (
        "| date | device | model | batch×ctx | tokens/s | step ms | Lightning/plain | ours/HF | "
        "Aioli/strat | DoGE/strat | DoReMi/strat | sampler/step | MFU | swarm serial/parallel |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n\nRows appended by `make bench` (see `aioli_repro/bench.py`).\n\n")
    lines = path.read_text().splitlines(keepends=True)
    head = header.splitlines(keepends=True)[0]
    if head not in lines:
        lines += ["\n", *header.splitlines(keepends=True)]
    end = len(lines) - 1 - lines[::-1].index(head)  # the last table with this header
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines.insert(end + 1, _markdown_row(r))
    path.write_text("".join(lines))


def _markdown_row(r: dict) -> str:
    m = r.get("model") or {}
    shape = f"{r['batch_size']}×{r['context_length']}" if r.get("batch_size") else "—"
    missing = "; ".join(f"{k}: {', '.join(r.get(k) or [])}" for k in ("cut", "failed") if r.get(k))
    device = r["device"] + (" (compiled)" if r.get("compile") else "") + (f" ({missing})" if missing else "")
    return (
        f"| {time.strftime('%Y-%m-%d')} | {device} | {m.get('n_layer', '?')}L d{m.get('d_model', '?')} | "
        f"{shape} | "
        f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['step_ms'], '.1f')} | "
        f"{_fmt(r['lightning_vs_plain'])} | {_fmt(r['ours_vs_hf'])} | {_fmt(r['aioli_vs_stratified'])} | "
        f"{_fmt(r['doge_vs_stratified'])} | {_fmt(r['doremi_vs_stratified'])} | "
        f"{_fmt(r['sampler_vs_step'], '.1f')} | {_fmt(r['mfu'], '.1%')} | {_swarm_cell(r)} |\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
