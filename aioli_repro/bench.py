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
from aioli_repro.mixing.static import Stratified
from aioli_repro.model import build_model, lm_token_losses
from aioli_repro.training.callbacks import MixingCallback
from aioli_repro.training.clipping import clip_gradients_
from aioli_repro.training.device_settings import apply_process_settings, resolve_device_settings
from aioli_repro.training.module import MixingLM, OptimConfig, lr_at, param_groups

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
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        precision=settings.precision,
        callbacks=[MixingCallback(Stratified()), timer],
        log_every_n_steps=cfg.train.log_every,
        gradient_clip_val=float(cfg.train.grad_clip),
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
        batch = dm.draw_batch()
        tokens = batch.tokens.to(device, non_blocking=True)
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


def bench_methods(base: list[str], steps: int, methods: list[str]) -> dict[str, float]:
    """Wall-clock of training `steps` steps with each method / stratified (same data, model, seed)."""
    from aioli_repro.training.run import run_training

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def fit_time(method: str, extra: list[str], extras: dict | None = None) -> tuple[float, Path]:
            cfg = _cfg([*base, f"method={method}", f"train.max_steps={steps}", *extra])
            run_dir = Path(tmp) / method
            s = run_training(cfg, run_dir, extras=extras)
            if s.get("method_evals"):  # the method's own validation passes (Aioli: LearnParams)
                out[f"{method}_eval_share"] = s["method_eval_s"] / s["fit_s"]
                out[f"{method}_evals"] = s["method_evals"]
            return s["fit_s"], run_dir

        t_strat, strat_dir = fit_time("stratified", ["train.checkpoint_every=0"])
        for m in methods:
            extras = None
            if m == "doremi":
                extras = {"reference_checkpoint": str(strat_dir / "checkpoints" / "final.ckpt")}
            if m == "skillit":
                continue
            extra = ["train.checkpoint_every=0"]
            if m == "aioli":  # two rounds in the benchmark's step budget, the hp's LearnParams share
                extra.append(f"hp.aioli.update_steps={steps // 2}")
            t, _ = fit_time(m, extra, extras)
            out[f"{m}_vs_stratified"] = t / t_strat
    return out


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
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--md", default="docs/benchmarks.md")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Every benchmark of the module docstring on this machine; writes --out and appends to --md."""
    args = _parser().parse_args(argv)
    from aioli_repro.training.preflight import build_data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    base = [f"scale={args.scale}", "logger=none", "progress=false"]
    base += [f"model={args.model}"] if args.model else []
    base += [f"data={args.data}"] if args.data else []
    base += ["train.compile=true"] if args.compile else []
    cfg = _cfg(base)
    apply_process_settings(resolve_device_settings(cfg))  # TF32 as a training run sets it
    _, packed = build_data(cfg)
    name = _device_name(device)
    t = cfg.train
    print(f"[bench] device: {name}; model {cfg.model}; batch {t.batch_size} x {t.context_length}")
    result = {"device": name, **_step_throughput(cfg, packed, args.steps, args.pairs, device)}
    result["ours_vs_hf"] = bench_hf(cfg, max(6, args.steps // 5), device)
    result["sampler_vs_step"] = bench_sampler(cfg, packed) / result["tokens_per_s"]
    result.update(_memory_and_mfu(cfg, result["tokens_per_s"], device, name))
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        result.update(bench_methods(base, args.method_steps, methods))
    for m in ("aioli", "doge", "doremi"):
        result.setdefault(f"{m}_vs_stratified", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _append_markdown(Path(args.md), result)
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=2))
    return result


def _step_throughput(cfg: DictConfig, packed: object, steps: int, n_pairs: int, device: torch.device) -> dict:
    """Our Lightning step against a plain PyTorch loop, per phase.

    Plain and Lightning runs alternate and the median of the per-pair ratios is kept: on a shared or
    throttling machine a single plain/Lightning/plain bracket swings by +-10% (measured)."""
    warm = max(3, steps // 10)
    pairs, light_all, plain_all, phases = [], [], [], None
    for _ in range(max(1, n_pairs)):
        plain_times, ph = bench_plain(cfg, packed, steps, device)
        light_times = bench_lightning(cfg, packed, steps, device)
        phases = phases or ph
        p_med, l_med = statistics.median(plain_times[warm:]), statistics.median(light_times[warm:])
        pairs.append(l_med / p_med)
        plain_all += plain_times[warm:]
        light_all += light_times[warm:]
    plain_med, light_med = statistics.median(plain_all), statistics.median(light_all)
    tokens_per_step = cfg.train.batch_size * cfg.train.context_length
    return {
        "model": {k: v for k, v in dict(cfg.model).items() if k != "_target_"},
        "batch_size": cfg.train.batch_size,
        "context_length": cfg.train.context_length,
        "steps": steps,
        "tokens_per_s": tokens_per_step / light_med,
        "plain_tokens_per_s": tokens_per_step / plain_med,
        "step_ms": light_med * 1e3,
        "lightning_vs_plain": statistics.median(pairs),
        "lightning_vs_plain_pairs": pairs,
        "phase_ms": {k: 1e3 * statistics.median(v[warm:]) for k, v in phases.items()},
    }


def _memory_and_mfu(cfg: DictConfig, tokens_per_s: float, device: torch.device, name: str) -> dict:
    """GPU: model FLOP utilisation and peak memory; CPU: peak resident memory (no MFU)."""
    if device.type != "cuda":
        import resource

        return {"mfu": None, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    model = build_model(instantiate(cfg.model))
    peak = _peak_flops(name)
    mfu = model.flops_per_token(cfg.train.context_length) * tokens_per_s / peak if peak else None
    return {"mfu": mfu, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def _fmt(v: object, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _append_markdown(path: Path, r: dict) -> None:
    header = (
        "| date | device | model | batch×ctx | tokens/s | step ms | Lightning/plain | ours/HF | "
        "Aioli/strat | DoGE/strat | DoReMi/strat | sampler/step | MFU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Benchmarks\n\nRows appended by `make bench` (see `aioli_repro/bench.py`).\n\n" + header
        )
    text = path.read_text()
    if "| date | device |" not in text:
        text += "\n" + header
    m = r["model"]
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {r['device']} | {m.get('n_layer')}L d{m.get('d_model')} | "
        f"{r['batch_size']}×{r['context_length']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
        f"{_fmt(r['lightning_vs_plain'])} | {_fmt(r['ours_vs_hf'])} | {_fmt(r['aioli_vs_stratified'])} | "
        f"{_fmt(r['doge_vs_stratified'])} | {_fmt(r['doremi_vs_stratified'])} | "
        f"{_fmt(r['sampler_vs_step'], '.1f')} | "
        f"{_fmt(r['mfu'], '.1%') if r['mfu'] is not None else '—'} |\n"
    )
    path.write_text(text + row)


if __name__ == "__main__":
    main(sys.argv[1:])
