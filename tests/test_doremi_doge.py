"""DoReMi and DoGE proxies on a tiny real decoder: weight dynamics, exact losses/gradients, state."""

from __future__ import annotations

import copy
import io
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from aioli_repro.mixing import doge as doge_module
from aioli_repro.mixing.base import Batch, MixingContext, StepContext
from aioli_repro.mixing.doge import DoGE, _clip_coef
from aioli_repro.mixing.doremi import DoReMi
from aioli_repro.mixing.simplex import softmax
from aioli_repro.model import ModelConfig, build_model, lm_token_losses

CFG = ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, context_length=32)
T = 17


def group_rows(group: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Group 0: counting up by 1 in tokens [0, 32); group 1: counting up by 7 in [32, 64); group 2: noise."""
    start = rng.integers(0, 32, size=(n, 1))
    steps = np.arange(T)[None, :]
    if group == 0:
        return (start + steps) % 32
    if group == 1:
        return 32 + (start + 7 * steps) % 32
    return rng.integers(0, 64, size=(n, T))


def make_batch(counts: list[int], seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    rows = [group_rows(g, n, rng) for g, n in enumerate(counts) if n]
    gids = [g for g, n in enumerate(counts) for _ in range(n)]
    return Batch(torch.from_numpy(np.concatenate(rows)).long(), torch.tensor(gids))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CFG)


def fake_module(model: torch.nn.Module, lr: float = 1e-3, accumulate: int = 1, val: list | None = None):
    """The step context a method sees inside the training step."""
    return StepContext(
        step=0,
        model=model,
        model_config=CFG,
        device=torch.device("cpu"),
        lr=lr,
        accumulate_grad_batches=accumulate,
        val_sequences=lambda: val,
    )


def ctx(m: int = 2, seed: int = 0) -> MixingContext:
    return MixingContext(groups=["a", "b", "c"][:m], max_steps=100, batch_size=8, seed=seed)


def seq_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return lm_token_losses(model, batch.tokens).float().mean(dim=1)


def save_ckpt(model: torch.nn.Module, path: Path) -> str:
    """A Lightning-style checkpoint: decoder keys under `model.` next to unrelated entries."""
    sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["_log_sum"] = torch.zeros(2)
    torch.save({"state_dict": sd, "global_step": 5, "callbacks": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The proxy's init trained on group b only: its loss on b is far below the untrained proxy's."""
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        loss = seq_losses(model, make_batch([0, 8], seed=100 + step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_ckpt(model, tmp_path_factory.mktemp("ref") / "ref.ckpt")


# -- DoReMi ---------------------------------------------------------------------------------------
def test_doremi_upweights_group_with_larger_excess(reference_ckpt: str) -> None:
    model = make_model(0)
    module = fake_module(model)
    method = DoReMi(mu=0.5, reference_checkpoint=reference_ckpt)
    method.setup(ctx())
    for step in range(10):
        batch = make_batch([4, 4], seed=step)
        alpha_before = method.alpha.copy()
        seq = seq_losses(model, batch)
        loss = method.training_loss(batch, seq, module)
        # paper order: alpha is updated from this batch, then weights its loss: sum_i alpha_i L_i
        expected = sum(method.alpha[g] * seq[batch.group_ids == g].mean() for g in range(2))
        assert torch.allclose(loss, expected, atol=1e-6)
        assert not np.allclose(alpha_before, method.alpha) or step == 0
    assert method.n_updates == 10
    assert method.scores[1] > 1.0 > method.scores[0] >= 0.0
    assert method.alpha[1] > 0.9 and method.alpha[1] > method.alpha[0]
    final = method.final_proportions()
    assert final is not None and final[1] > final[0]
    assert final.sum() == pytest.approx(1.0, abs=1e-12)
    # the reference is frozen, in eval mode and never part of the graph
    ref = method.reference_model
    assert ref is not None and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    metrics = method.log_metrics()
    assert set(metrics) >= {"doremi/alpha/a", "doremi/alpha/b", "doremi/excess/a", "doremi/excess/b"}
    assert method.log_metrics() == {}  # nothing new until the next logging point


def test_doremi_negative_excess_is_clipped(tmp_path: Path) -> None:
    model = make_model(0)
    worse = copy.deepcopy(model)
    with torch.no_grad():
        worse.embed_out.weight.mul_(50.0)  # a much worse reference: L - R < 0 for every group
    method = DoReMi(mu=1.0, reference_checkpoint=save_ckpt(worse, tmp_path / "worse.ckpt"))
    method.setup(ctx())
    for step in range(3):
        batch = make_batch([4, 4], seed=step)
        method.training_loss(batch, seq_losses(model, batch), fake_module(model))
    np.testing.assert_array_equal(method.scores, [0.0, 0.0])
    np.testing.assert_allclose(method.alpha, [0.5, 0.5], atol=1e-15)
    # token-level clipping (original DoReMi) is >= the group-level one (mean of max >= max of mean)
    token = DoReMi(mu=1.0, reference_checkpoint=str(tmp_path / "worse.ckpt"), clip="token")
    token.setup(ctx())
    batch = make_batch([4, 4], seed=0)
    token.training_loss(batch, seq_losses(model, batch), fake_module(model))
    assert np.all(token.scores >= 0.0)


def test_doremi_absent_group_keeps_previous_score(reference_ckpt: str) -> None:
    model = make_model(0)
    method = DoReMi(reference_checkpoint=reference_ckpt)
    method.setup(ctx())
    batch = make_batch([4, 4])
    method.training_loss(batch, seq_losses(model, batch), fake_module(model))
    before = method.scores.copy()
    only_a = make_batch([6, 0], seed=3)
    loss = method.training_loss(only_a, seq_losses(model, only_a), fake_module(model))
    assert before[1] > 0 and method.scores[1] == before[1]  # b absent: its last excess is reused
    # an absent group contributes nothing to the loss (no renormalisation over present groups)
    assert loss.item() == pytest.approx(method.alpha[0] * seq_losses(model, only_a).mean().item(), rel=1e-6)


def test_doremi_gradient_accumulation_matches_one_batch(reference_ckpt: str) -> None:
    """Two micro-batches (Lightning divides each loss by 2) == one optimizer step on both at once.

    Under accumulation the step's excess is known only at its end, so both sides weight with the alpha in
    force when the step began (`weight_with="previous"`, which accumulation always uses).
    """
    warm = make_batch([4, 4], seed=7)
    mb1, mb2 = make_batch([2, 2], seed=1), make_batch([2, 2], seed=2)
    both = Batch(torch.cat([mb1.tokens, mb2.tokens]), torch.cat([mb1.group_ids, mb2.group_ids]))

    def run(micro: list[Batch]) -> tuple[np.ndarray, list[torch.Tensor]]:
        model = make_model(0)
        method = DoReMi(mu=0.5, reference_checkpoint=reference_ckpt, weight_with="previous")
        method.setup(ctx())
        method.training_loss(warm, seq_losses(model, warm), fake_module(model))  # makes alpha non-uniform
        module = fake_module(model, accumulate=len(micro))
        for b in micro:
            assert method.n_updates == 1  # no update before the step's last micro-batch
            (method.training_loss(b, seq_losses(model, b), module) / len(micro)).backward()
        assert method.n_updates == 2
        return method.alpha.copy(), [p.grad.clone() for p in model.parameters()]

    alpha_1, grads_1 = run([both])
    alpha_2, grads_2 = run([mb1, mb2])
    assert not np.allclose(alpha_1, 0.5)
    np.testing.assert_allclose(alpha_2, alpha_1, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads_1, grads_2):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)


def test_doremi_state_round_trip(reference_ckpt: str) -> None:
    model = make_model(0)
    module = fake_module(model, accumulate=2)
    a = DoReMi(mu=0.5, reference_checkpoint=reference_ckpt)
    a.setup(ctx())
    batches = [make_batch([3, 5], seed=s) for s in range(8)]
    for b in batches[:3]:  # ends mid-window: the accumulation buffers must travel too
        a.training_loss(b, seq_losses(model, b), module)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b_ = DoReMi(mu=0.5, reference_checkpoint=reference_ckpt)
    b_.setup(ctx())
    b_.load_state_dict(torch.load(buf, weights_only=True))  # checkpoint-safe plain types only
    for b in batches[3:]:
        la = a.training_loss(b, seq_losses(model, b), module)
        lb = b_.training_loss(b, seq_losses(model, b), module)
        assert la.item() == lb.item()
        np.testing.assert_array_equal(a.alpha, b_.alpha)
    np.testing.assert_array_equal(a.final_proportions(), b_.final_proportions())


class NumpyDoReMiRule:
    """DoReMi's update as it ran on the host in numpy before issue 24: the reference for the device one."""

    def __init__(self, m: int, mu: float, smoothing: float, clip: str) -> None:
        self.m, self.mu, self.smoothing, self.clip = m, mu, smoothing, clip
        self.alpha, self.avg, self.scores, self.n_updates = np.full(m, 1.0 / m), np.zeros(m), np.zeros(m), 0
        self.window = np.zeros((3, m))  # per-group proxy loss, reference loss / token excess, count

    def add(self, method: DoReMi, model: torch.nn.Module, batch: Batch, seq: torch.Tensor) -> None:
        """The micro-batch's per-group sums, computed as the former code did (float64 index_add)."""
        with torch.no_grad():
            ref_tok = lm_token_losses(method.reference_model, batch.tokens).float()
            if self.clip == "group":
                excess_rows = ref_tok.mean(dim=1)
            else:
                proxy_tok = lm_token_losses(model, batch.tokens).float()
                excess_rows = (proxy_tok - ref_tok).clamp_min(0).mean(dim=1)
            rows = torch.stack([seq.detach(), excess_rows, torch.ones_like(excess_rows)]).double()
            sums = torch.zeros(3, self.m, dtype=torch.float64).index_add_(1, batch.group_ids, rows)
            self.window += sums.numpy()

    def update(self) -> None:
        proxy, excess_sum, count = self.window
        n = np.maximum(count, 1)
        if self.clip == "group":
            excess = np.maximum(proxy / n - excess_sum / n, 0.0)
        else:
            excess = excess_sum / n
        self.scores = np.where(count > 0, excess, self.scores)
        log_a = np.log(self.alpha) + self.mu * self.scores
        a = softmax(log_a)
        self.alpha = (1.0 - self.smoothing) * a + self.smoothing / self.m
        self.avg += self.alpha
        self.n_updates += 1
        self.window[:] = 0.0


@pytest.mark.parametrize(("clip", "accumulate"), [("group", 1), ("token", 1), ("group", 2)])
def test_doremi_device_update_matches_the_numpy_one(reference_ckpt: str, clip: str, accumulate: int) -> None:
    """30 optimizer steps of a training proxy, 3 groups, some absent from some steps: the float64 torch
    update gives the numpy update's alpha, scores and average to 1e-12 (measured: at most 2e-17)."""
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    method = DoReMi(mu=0.5, smoothing=1e-2, reference_checkpoint=reference_ckpt, clip=clip)
    method.setup(ctx(3))
    rule = NumpyDoReMiRule(3, 0.5, 1e-2, clip)
    counts = [[3, 3, 2], [4, 0, 4], [0, 5, 3], [2, 2, 4], [6, 2, 0]]
    module = fake_module(model, accumulate=accumulate)
    worst = 0.0
    for step in range(30):
        opt.zero_grad()
        for micro in range(accumulate):
            batch = make_batch(counts[(step + micro) % len(counts)], seed=1000 * step + micro)
            seq = seq_losses(model, batch)
            loss = method.training_loss(batch, seq, module)
            rule.add(method, model, batch, seq)
            (loss / accumulate).backward()
        opt.step()
        rule.update()
        assert method.n_updates == rule.n_updates == step + 1
        for name in ("alpha", "scores", "avg"):
            worst = max(worst, float(np.abs(getattr(method, name) - getattr(rule, name)).max()))
    assert worst <= 1e-12, worst
    assert np.abs(rule.alpha - 1 / 3).max() > 0.05  # the weights moved: the comparison is not trivial
    np.testing.assert_allclose(method.final_proportions(), rule.avg / rule.avg.sum(), rtol=0, atol=1e-12)


def test_doremi_reference_from_extras_and_missing(reference_ckpt: str) -> None:
    model = make_model(0)
    method = DoReMi()
    method.setup(MixingContext(["a", "b"], 10, 8, 0, extras={"reference_checkpoint": reference_ckpt}))
    batch = make_batch([4, 4])
    method.training_loss(batch, seq_losses(model, batch), fake_module(model))
    assert method.n_updates == 1
    missing = DoReMi()
    missing.setup(ctx())
    with pytest.raises(ValueError, match="reference"):
        missing.training_loss(batch, seq_losses(model, batch), fake_module(model))
    with pytest.raises(ValueError, match="clip"):
        DoReMi(clip="bogus")


# -- DoGE -----------------------------------------------------------------------------------------
def val_like_group0(n: int = 16) -> list[np.ndarray]:
    """Val split where every group's sequences look like group 0 (so g_0 aligns with g_val)."""
    rng = np.random.default_rng(99)
    return [group_rows(0, n, rng), group_rows(0, n, rng), group_rows(0, n, rng)]


def _grad_norm(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Global L2 norm over a gradient tuple, as `clip_grad_norm_` computes it."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _dot(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([torch.sum(x.float() * y.float()) for x, y in zip(a, b)]).sum()


class ReferenceDoGE(DoGE):
    """DoGE's per-step computation before per-group forwards (one process), kept as the reference:
    each group's gradient by `autograd.grad` through the retained whole-batch graph, and a returned loss
    sum_i alpha_i * clip_i * l_i backpropagated through that same graph."""

    def training_loss(self, batch: Batch, seq_loss: torch.Tensor, step: StepContext) -> torch.Tensor:
        params = [p for p in step.model.parameters() if p.requires_grad]

        def grads_of(loss: torch.Tensor, retain: bool) -> tuple[torch.Tensor, ...]:
            gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params))

        g_val = grads_of(lm_token_losses(step.model, self._val_batch(step)).float().mean(), False)
        val_coef = _clip_coef(_grad_norm(g_val))
        m = self.ctx.m
        dots, norms, coefs = torch.zeros(m), torch.zeros(m), torch.ones(m)
        losses = {}
        for i in range(m):
            mask = batch.group_ids == i
            if not bool(mask.any()):
                continue
            losses[i] = seq_loss[mask].mean()
            g_i = grads_of(losses[i], True)
            norm = _grad_norm(g_i)
            coefs[i] = _clip_coef(norm)
            norms[i] = norm * coefs[i]
            dots[i] = _dot(g_i, g_val) * coefs[i] * val_coef
        lr = float(step.lr)
        dots_np, norms_np = dots.detach().double().numpy(), norms.detach().double().numpy()
        self.scores = np.clip(lr * dots_np / (norms_np.mean() + 1e-6), 0.0, lr * self.score_clip)
        log_a = self.log_alpha + self.scores / self.mu
        top = log_a.max()
        self.log_alpha = log_a - (top + np.log(np.exp(log_a - top).sum()))
        self._record(np.exp(self.log_alpha))
        weights = torch.as_tensor(self.alpha, dtype=seq_loss.dtype) * coefs.detach()
        return torch.stack([weights[i] * loss_i for i, loss_i in losses.items()]).sum()


def mixed_val(n: int = 16) -> list[np.ndarray]:
    """Val split with each group's own kind of sequences (some group gradients align with g_val, some not)."""
    rng = np.random.default_rng(98)
    return [group_rows(g, n, rng) for g in range(3)]


def loss_and_grads(method: DoGE, batch: Batch, model: torch.nn.Module, module: StepContext):
    """The method's loss on `batch` and the gradient its backward gives (halved, as with accumulate=2)."""
    model.zero_grad(set_to_none=True)
    loss = method.training_loss(batch, seq_losses(model, batch), module)
    (loss / 2).backward()  # a scaled backward (Lightning's 1/k, a loss scaler) must scale the gradient too
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "counts",
    [
        [[4, 2], [3, 3], [6, 0], [1, 5], [2, 4]],  # m=2; step 3 has no group-b row
        [[2, 2, 2], [3, 0, 3], [1, 4, 1], [0, 5, 1], [2, 3, 1]],  # m=3; groups absent at steps 2 and 4
    ],
    ids=["m2", "m3"],
)
def test_doge_matches_the_retained_graph_reference(counts: list[list[int]]) -> None:
    """Per-group forwards give today's DoGE: the same weights, scores, loss and parameter gradients.

    Both run on the same weights each step (updated with the reference's gradient), each keeping its own
    alpha. Tolerances: the group gradients now come from forwards on fewer rows (other fp32 GEMM
    blocking and summation order), so their entries differ from the reference's by fp32 rounding, measured
    up to ~1e-6 of the largest entry. Gradients: 1e-5 relative, with an absolute floor of 1e-5 of the
    tensor's largest entry (for entries that nearly cancel). Scores are dot products of such vectors:
    measured up to 7.5e-7 relative, checked at 3e-6 of the largest score. alpha and log alpha move by
    score / mu on top of O(1) values: measured below 1e-7 relative, checked at 1e-6; the loss value
    (through the clip factors): measured 5e-7, checked at 2e-6.
    Even steps take the batch's host-side group counts (no device read), odd steps count on the device.
    """
    m = len(counts[0])
    model = make_model(2)
    module = fake_module(model, lr=2e-3, val=mixed_val()[:m])
    new, ref = DoGE(mu=0.01, val_batch_size=3), ReferenceDoGE(mu=0.01, val_batch_size=3)
    new.setup(ctx(m, seed=5))
    ref.setup(ctx(m, seed=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step, c in enumerate(counts):
        batch = make_batch(c, seed=10 + step)
        if step % 2 == 0:  # the counts the datamodule's sampler attaches
            batch.group_counts = np.bincount(batch.group_ids.numpy(), minlength=m).astype(np.float64)
        loss, grads = loss_and_grads(new, batch, model, module)
        want_loss, want = loss_and_grads(ref, batch, model, module)
        np.testing.assert_allclose(new.scores, ref.scores, rtol=3e-6, atol=3e-6 * ref.scores.max())
        np.testing.assert_allclose(new.alpha, ref.alpha, rtol=1e-6, atol=0)
        np.testing.assert_allclose(new.log_alpha, ref.log_alpha, rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=0)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
        opt.step()  # the model moves on (with the reference's gradient, in .grad now)
    assert np.ptp(new.alpha) > 0.05  # the weights did move: the comparison is not between uniform alphas
    assert (np.asarray(new.scores) > 0).any()


def test_doge_never_backpropagates_through_the_whole_batch_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gradients come from fresh per-group graphs: nothing flows back into the module's `seq_loss`
    (the reference did m + 1 passes through it) and no graph is ever retained. With the sampler's host
    counts on the batch, the groups' rows are found without counting on the device."""
    retains: list[object] = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        retains.append(kwargs.get("retain_graph"))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    model = make_model(0)
    method = DoGE(val_batch_size=2)
    method.setup(ctx(3))
    batch = make_batch([3, 3, 2])
    batch.group_counts = np.array([3.0, 3.0, 2.0])  # from the sampler: nothing is counted on the device
    monkeypatch.setattr(torch, "bincount", None)
    seq = seq_losses(model, batch)
    passes = [0]
    seq.register_hook(lambda g: passes.__setitem__(0, passes[0] + 1))
    loss = method.training_loss(batch, seq, fake_module(model, val=val_like_group0()))
    loss.backward()
    assert passes[0] == 0
    assert len(retains) == 4 and not any(retains)  # val + one per group, each graph freed at once
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_doge_upweights_group_aligned_with_validation() -> None:
    model = make_model(0)
    module = fake_module(model, lr=1e-3, val=val_like_group0()[:2])
    method = DoGE(mu=0.01, val_batch_size=4, log_every=5)
    method.setup(ctx())
    trajectory = []
    for step in range(5):
        batch = make_batch([4, 4], seed=step)
        method.training_loss(batch, seq_losses(model, batch), module)
        assert method.scores[0] > 0.0 == method.scores[1]  # g_b points away from g_val: clipped at 0
        assert np.all(method.scores <= 1e-3 * 5.0 + 1e-12)
        trajectory.append(method.alpha[0])
    assert method.n_updates == 5
    assert np.all(np.diff(trajectory) > 0) and trajectory[-1] > 0.58
    final = method.final_proportions()
    assert final is not None and final[0] > final[1] and final.sum() == pytest.approx(1.0, abs=1e-12)
    assert {"doge/alpha/a", "doge/score/b"} <= set(method.log_metrics())


def test_doge_gradient_is_weighted_sum_of_clipped_group_gradients() -> None:
    model = make_model(1)
    params = list(model.parameters())
    module = fake_module(model, lr=5e-4, val=val_like_group0())
    method = DoGE(mu=0.01, val_batch_size=2)
    method.setup(ctx(3))
    batch = make_batch([3, 2, 3], seed=4)
    loss = method.training_loss(batch, seq_losses(model, batch), module)
    model.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in params]

    # by hand: sum_i alpha_i * clip(g_i), with the alpha after this step's update
    want = [torch.zeros_like(p) for p in params]
    for g in range(3):
        seq = seq_losses(model, batch)
        grads = torch.autograd.grad(seq[batch.group_ids == g].mean(), params)
        coef = _clip_coef(_grad_norm(grads))
        for w, gr in zip(want, grads):
            w += float(method.alpha[g]) * coef * gr
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in got]))
    assert total <= 1.0 + 1e-5  # so the module's own clip at 1.0 does not change it


def test_doge_gradient_memory_is_one_set_per_group_plus_val(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory design, checked at run time: g_val and one flat gradient per present group are alive at the
    peak (m + 1 model-sized sets, whatever the batch size); the returned loss keeps only their weighted
    sum (formed in place), and nothing once its backward ran."""
    flats: list[weakref.ref] = []
    peak = [0]
    real_flat_grad = doge_module._flat_grad

    def tracking_flat_grad(*args, **kwargs):
        out = real_flat_grad(*args, **kwargs)
        flats.append(weakref.ref(out))
        peak[0] = max(peak[0], sum(r() is not None for r in flats))
        return out

    monkeypatch.setattr(doge_module, "_flat_grad", tracking_flat_grad)
    model = make_model(0)
    method = DoGE(val_batch_size=2)
    method.setup(ctx(3))
    batch = make_batch([3, 3, 2])
    loss = method.training_loss(batch, seq_losses(model, batch), fake_module(model, val=val_like_group0()))
    assert len(flats) == 4  # val + 3 groups
    assert peak[0] == 4
    assert sum(r() is not None for r in flats) == 1  # the weighted sum, held by the loss
    loss.backward()
    del loss
    assert all(r() is None for r in flats)


def test_doge_state_round_trip_and_val_sampling() -> None:
    val = val_like_group0()
    model = make_model(0)
    module = fake_module(model, val=val)
    a = DoGE(mu=0.01, val_batch_size=2, val_sampling="per_group")
    a.setup(ctx(3, seed=3))
    batches = [make_batch([3, 3, 2], seed=s) for s in range(6)]
    for b in batches[:2]:
        a.training_loss(b, seq_losses(model, b), module)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b_ = DoGE(mu=0.01, val_batch_size=2, val_sampling="per_group")
    b_.setup(ctx(3, seed=3))
    b_.load_state_dict(torch.load(buf, weights_only=True))
    for b in batches[2:]:
        la = a.training_loss(b, seq_losses(model, b), module)
        lb = b_.training_loss(b, seq_losses(model, b), module)
        assert la.item() == lb.item()  # same val draws (generator state restored) and same alpha
        np.testing.assert_array_equal(a.alpha, b_.alpha)
    np.testing.assert_array_equal(a.final_proportions(), b_.final_proportions())
    # pooled sampling weights groups by val-set size; per-group sampling is uniform over groups
    sizes = [np.zeros((1, T), int), np.ones((99, T), int)]
    for mode, lo, hi in (("pooled", 0.0, 0.03), ("per_group", 0.4, 0.6)):
        d = DoGE(val_batch_size=1000, val_sampling=mode)
        d.setup(ctx(2))
        tokens = d._val_batch(fake_module(model, val=sizes))
        assert lo <= (tokens[:, 0] == 0).float().mean().item() <= hi


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["tiny", "paper"])
@pytest.mark.parametrize("method", ["doremi", "doge"])
def test_doremi_doge_released_hyper_parameters(method: str, scale: str) -> None:
    """mu and the proxy schedule per m (composition itself: test_config's matrix)."""
    steps = (5000, 5000, 40000)  # (m=2, m=3, m=7) at paper scale
    expected = {
        "doremi": {"mu": (0.01, 0.01, 0.01), "proxy_steps": steps, "proxy_batch_size": (8, 8, 8)},
        "doge": {"mu": (0.01, 0.01, 0.1), "proxy_steps": steps, "proxy_batch_size": (6, 4, 4)},
    }[method]
    for k, groups in enumerate(["a_se", "a_b_se", "slimpajama_all"]):
        cfg = compose_config(f"method={method}", f"groups={groups}", f"scale={scale}")
        assert cfg.method.name == method
        mixer = instantiate(cfg.method.mixer)
        assert isinstance(mixer, DoReMi if method == "doremi" else DoGE)
        pipe = cfg.method.pipeline
        if scale == "paper":
            assert mixer.mu == expected["mu"][k]
            assert pipe.proxy_steps == expected["proxy_steps"][k]
            assert pipe.proxy_batch_size == expected["proxy_batch_size"][k]
            if method == "doge":
                assert mixer.val_batch_size == (2, 4, 4)[k]
        else:
            assert pipe.proxy_steps == cfg.train.max_steps
            assert pipe.proxy_batch_size + (mixer.val_batch_size if method == "doge" else 0) == 8
