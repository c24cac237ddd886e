"""The Pythia-architecture decoder: sizes, HF parity, loss, causality, training, attention back-ends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import aioli_repro.model as model_mod
from aioli_repro.model import GPTNeoX, ModelConfig, build_model, lm_token_losses

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = dict(n_layer=2, d_model=64, n_head=4, vocab_size=320, context_length=128)

# Exact parameter counts: the HF checkpoints' for the Pythia models, our own for the miniatures.
EXPECTED_PARAMS = {
    "pythia_160m": 162_322_944,
    "pythia_70m": 70_426_624,
    "small": 10_893_312,
    "tiny": 875_264,
}


def _load_yaml_config(name: str) -> ModelConfig:
    return instantiate(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))


def _tiny_model(seed: int = 0, **overrides) -> GPTNeoX:
    torch.manual_seed(seed)
    return GPTNeoX(ModelConfig(**{**TINY, **overrides}))


def test_pythia_160m_has_exactly_the_hf_parameter_count():
    cfg = ModelConfig(n_layer=12, d_model=768, n_head=12, vocab_size=50304, context_length=2048, d_ff=3072)
    with torch.device("meta"):  # no memory, no init cost
        model = GPTNeoX(cfg)
    assert model.num_parameters() == 162_322_944
    # embed_in (a lookup) is the only thing not counted in the FLOPs estimate
    assert model.num_parameters(exclude_input_embedding=True) == 162_322_944 - 50304 * 768
    n = 162_322_944 - 50304 * 768
    assert model.flops_per_token(2048) == 6 * n + 12 * 12 * 768 * 2048


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_yaml_configs_instantiate_with_expected_sizes(name: str):
    cfg = _load_yaml_config(name)
    assert isinstance(cfg, ModelConfig)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_parameters() == EXPECTED_PARAMS[name]
    if name == "tiny":
        assert 0.5e6 < model.num_parameters() < 2e6
        assert cfg.vocab_size >= 257 and cfg.vocab_size % 64 == 0
        assert cfg.context_length == 256


def test_build_model_from_dict_and_dictconfig_matches_dataclass():
    raw = OmegaConf.load(CONF_MODEL / "tiny.yaml")
    with torch.device("meta"):
        a = build_model(raw)  # DictConfig with _target_
        b = build_model(dict(TINY))
    assert a.config == _load_yaml_config("tiny")
    assert b.config == ModelConfig(**TINY)
    with pytest.raises(ValueError, match="name"):
        build_model({**TINY, "name": "tiny"})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=70), "d_model"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(rotary_pct=1.5), "rotary_pct"),
        (dict(rotary_pct=0.1), "rotary_pct"),  # 1.6 of 16 dims -> 1 rotary dim: odd
        (dict(d_ff=0), "d_ff"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(init_std=-0.1), "init_std"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**{**TINY, **overrides})


def test_config_defaults():
    cfg = ModelConfig(**TINY)
    assert cfg.d_ff == 4 * 64 and cfg.head_dim == 16 and cfg.rotary_dim == 4
    assert cfg.parallel_residual and cfg.bias and not cfg.use_flash_attn


def test_init_statistics():
    model = _tiny_model(d_model=256, n_head=4)
    w = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert abs(w.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(model.gpt_neox.layers[0].attention.query_key_value.bias) == 0
    ln = model.gpt_neox.layers[0].input_layernorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert abs(model.gpt_neox.embed_in.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_logits_match_hf_gpt_neox(parallel_residual: bool):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPTNeoXConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=128,
        use_parallel_residual=parallel_residual,
        hidden_act="gelu",
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        layer_norm_eps=1e-5,
    )
    hf_cfg._attn_implementation = "eager"  # independent of our SDPA path
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # move LayerNorms and biases away from 1/0 so every parameter matters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = GPTNeoX(ModelConfig(**TINY, parallel_residual=parallel_residual)).eval()
    ours.load_hf_state_dict(hf.state_dict())
    x = torch.randint(0, 320, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
    assert ref.shape == got.shape == (3, 100, 320)
    diff = (ref - got).abs().max().item()
    assert diff < 1e-4, diff
    assert ref.abs().max().item() > 0.5  # not a trivially small comparison

    # and back: our weights in HF naming load into the HF module strictly
    head = "lm_head" if hasattr(hf, "lm_head") else "embed_out"
    hf.load_state_dict(ours.to_hf_state_dict(head_name=head), strict=True)


def test_hf_state_dict_roundtrip():
    a, b = _tiny_model(seed=0), _tiny_model(seed=1)
    b.load_hf_state_dict(a.to_hf_state_dict(head_name="lm_head"))
    x = torch.randint(0, 320, (2, 16))
    assert torch.equal(a(x).logits, b(x).logits)
    keys = set(a.to_hf_state_dict())
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in keys and "embed_out.weight" in keys


def test_token_loss_is_per_token_cross_entropy_with_ignored_targets_zero():
    model = _tiny_model().eval()
    x = torch.randint(0, 320, (2, 20))
    targets = torch.randint(0, 320, (2, 20))
    targets[0, 3] = -100
    targets[1, 0] = -100
    out = model(x, targets=targets, return_logits=True)
    assert out.token_loss.shape == (2, 20) and out.token_loss.dtype == torch.float32
    ref = F.cross_entropy(out.logits.reshape(-1, 320), targets.reshape(-1), reduction="none").view(2, 20)
    keep = targets != -100
    torch.testing.assert_close(out.token_loss[keep], ref[keep])
    assert out.token_loss[0, 3] == 0 and out.token_loss[1, 0] == 0
    # logits are not returned unless asked for when targets are given; always when they are not
    assert model(x, targets=targets).logits is None
    assert model(x).token_loss is None and model(x).logits.shape == (2, 20, 320)


def test_lm_token_losses_shifts_inputs():
    model = _tiny_model().eval()
    x = torch.randint(0, 320, (3, 33))
    losses = lm_token_losses(model, x)
    assert losses.shape == (3, 32) and losses.dtype == torch.float32
    logits = model(x[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, 320), x[:, 1:].reshape(-1), reduction="none").view(3, 32)
    torch.testing.assert_close(losses, ref)
    # an untrained model with std-0.02 init is close to uniform over the vocabulary
    assert abs(losses.mean().item() - torch.log(torch.tensor(320.0)).item()) < 0.1
    with pytest.raises(ValueError):
        lm_token_losses(model, x[:, :1])


def test_too_long_sequence_rejected():
    model = _tiny_model()
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_causality():
    model = _tiny_model().eval()
    x = torch.randint(0, 320, (2, 40))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        lx, ly = model(x).logits, model(y).logits
    torch.testing.assert_close(lx[:, :10], ly[:, :10], rtol=0, atol=1e-6)
    assert (lx[:, 10:] - ly[:, 10:]).abs().max() > 1e-3  # later positions do see the change


def test_rotary_makes_attention_order_aware():
    # There are no absolute position embeddings: without rotary, a one-layer model's output at the
    # last position is invariant to permuting the prefix (with more layers the earlier positions'
    # states depend on their own causal prefixes); with rotary it is not.
    x = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    perm = torch.cat([torch.randperm(15, generator=torch.Generator().manual_seed(1)), torch.tensor([15])])
    y = x[:, perm]
    rope = _tiny_model(n_layer=1).eval()
    no_rope = _tiny_model(n_layer=1, rotary_pct=0.0).eval()
    with torch.no_grad():
        assert (rope(x).logits[0, -1] - rope(y).logits[0, -1]).abs().max() > 1e-4
        torch.testing.assert_close(no_rope(x).logits[0, -1], no_rope(y).logits[0, -1], rtol=0, atol=1e-5)


def test_rotary_tables_made_in_inference_mode_serve_training_and_autocast():
    # The cos/sin tables are cached across forwards. A table first built under inference_mode (an
    # evaluation before the first training step) must still be saved for backward by a training step,
    # and autocast must get tables in its own dtype, not the fp32 ones cached earlier.
    model = _tiny_model(seed=0)
    x = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(0))  # a fresh length
    with torch.inference_mode():
        ref = model(x).logits
    out = model(x).logits
    out.float().pow(2).mean().backward()  # raises if a cached table is an inference tensor
    assert model.gpt_neox.layers[0].attention.query_key_value.weight.grad is not None
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(x).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("rotary_pct", [0.5, 1.0])
def test_rotary_matches_rotate_half_reference(rotary_pct: float):
    # GPT-NeoX rotary written out as HF writes it (cat + rotate_half), against our cached, sign-folded,
    # q-and-k-at-once version; rotary_pct 1.0 has no pass-through dims.
    from aioli_repro.model import _apply_rotary, _rotary_cos_sin

    g = torch.Generator().manual_seed(0)
    qk = torch.randn(2, 9, 3, 2, 16, generator=g)
    rot = int(16 * rotary_pct)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    emb = torch.cat([torch.arange(9.0)[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]
    x1, x2 = qk[..., : rot // 2], qk[..., rot // 2 : rot]
    expected = torch.cat([qk[..., :rot] * cos + torch.cat([-x2, x1], -1) * sin, qk[..., rot:]], -1)
    got = _apply_rotary(qk, *_rotary_cos_sin(9, rot, 10000.0, qk.device))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_gradients_flow_and_tiny_model_trains():
    torch.manual_seed(0)
    model = build_model(_load_yaml_config("tiny"))
    x = torch.randint(0, 320, (4, 65), generator=torch.Generator().manual_seed(0))
    loss = lm_token_losses(model, x).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = lm_token_losses(model, x).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = lm_token_losses(model, x).mean().item()
    assert first > 5.5  # ~ log(320) = 5.77 at init
    assert final < 1.0 and final < first - 4.0, (first, final)  # memorises the fixed batch (measured ~0.08)


def test_flash_attn_requested_without_it_falls_back_to_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(model_mod, "_flash_attn_func", None)  # as on a machine without flash-attn
    monkeypatch.setattr(model_mod, "_FLASH_WARNED", False)
    ref = _tiny_model(seed=3).eval()
    with caplog.at_level(logging.WARNING, logger="aioli_repro.model"):
        flash = _tiny_model(seed=3, use_flash_attn=True).eval()
        _tiny_model(seed=3, use_flash_attn=True)
    warnings = [r for r in caplog.records if "flash_attn" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not per model
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, flash(x).logits)


def test_flash_attn_not_used_on_cpu_even_if_installed(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("flash_attn_func must not be called on CPU / fp32")

    monkeypatch.setattr(model_mod, "_flash_attn_func", boom)
    ref = _tiny_model(seed=4).eval()
    flash = _tiny_model(seed=4, use_flash_attn=True).eval()
    assert flash.gpt_neox.layers[0].attention.use_flash_attn
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, flash(x).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_flash_attn", [False, True])
def test_bf16_autocast_on_gpu_matches_fp32(use_flash_attn: bool):
    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig(**{**TINY, "d_model": 128, "use_flash_attn": use_flash_attn})).cuda().eval()
    x = torch.randint(0, 320, (4, 128), device="cuda")
    with torch.no_grad():
        ref = lm_token_losses(model, x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1], targets=x[:, 1:], return_logits=True)
    assert out.logits.dtype == torch.bfloat16 and out.token_loss.dtype == torch.float32
    assert (out.token_loss - ref).abs().max().item() < 0.05
    assert abs(out.token_loss.mean().item() - ref.mean().item()) < 5e-3
