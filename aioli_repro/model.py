"""A native PyTorch GPT-NeoX decoder with the Pythia architecture.

Module names mirror HF `GPTNeoXForCausalLM` (`gpt_neox.layers.N.attention.query_key_value`, ...,
`embed_out`), so a Pythia checkpoint's state dict maps 1:1 (`load_hf_state_dict` also accepts the
`lm_head` name that newer transformers versions use). Per layer, with parallel residual:

    x = x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))

Attention is causal SDPA (or flash-attn 2 on CUDA in fp16/bf16 when asked for and installed),
with GPT-NeoX rotary embeddings on the first `rotary_pct` of each head's dimensions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

try:  # optional; only used on CUDA in half precision
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_func = None

_FLASH_WARNED = False
IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """Decoder shape. Defaults of the optional fields are Pythia's."""

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    context_length: int  # maximum number of positions a forward pass may take
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    d_ff: int | None = None  # None -> 4 * d_model
    layer_norm_eps: float = 1e-5
    parallel_residual: bool = True
    use_flash_attn: bool = False
    init_std: float = 0.02
    bias: bool = True  # biases on every Linear except embed_out (as HF GPT-NeoX)

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff <= 0:
            raise ValueError(
                f"model.d_ff: must be a positive integer (or null for 4 * d_model), got {self.d_ff!r}"
            )
        if self.d_model % self.n_head != 0:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if not 0.0 <= float(self.rotary_pct) <= 1.0:
            raise ValueError(f"model.rotary_pct: must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_dim % 2 != 0:
            raise ValueError(
                f"model.rotary_pct: gives an odd number of rotary dims ({self.rotary_dim} of head_dim "
                f"{self.head_dim}); rotary embeddings rotate pairs of dims"
            )
        if not float(self.rotary_base) > 0:
            raise ValueError(f"model.rotary_base: must be > 0, got {self.rotary_base!r}")
        if not float(self.layer_norm_eps) > 0:
            raise ValueError(f"model.layer_norm_eps: must be > 0, got {self.layer_norm_eps!r}")
        if not float(self.init_std) > 0:
            raise ValueError(f"model.init_std: must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        # int() truncation as HF: rotary_ndims = int(head_size * rotary_pct)
        return int(self.head_dim * self.rotary_pct)


class ModelOutput(NamedTuple):
    """A NamedTuple (not a dataclass) so torch.compile can return it without a graph break."""

    logits: torch.Tensor | None = None  # (B, T, V), only when asked for
    token_loss: torch.Tensor | None = None  # (B, T) fp32, 0 where the target is IGNORE_INDEX


_ROTARY_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rotary_cos_sin(
    seq_len: int, rotary_dim: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables (T, 1, 1, rotary_dim) in `dtype`, computed in fp32 exactly as HF does.

    sin carries rotate_half's sign (-sin on the first half), so rotation is x*cos + swap_halves(x)*sin.
    Cached per (shape, device, dtype) in a module-level table rather than a buffer, so that casting the
    model (e.g. to bf16) or building it on the meta device never corrupts them; the tables are small and
    never require grad. Recomputing them and the per-layer casts was ~30% of the tiny model's CPU forward.
    """
    compiling = torch.compiler.is_compiling()  # under torch.compile the tables fuse into the graph
    key = (seq_len, rotary_dim, base, str(device), dtype)
    hit = None if compiling else _ROTARY_CACHE.get(key)
    if hit is not None:
        return hit
    # never inference tensors (a table made during evaluation is reused by training, which saves it
    # for backward)
    with torch.inference_mode(False):
        cos, sin = _rotary_tables(seq_len, rotary_dim, base, device, dtype)
    if not compiling:
        if len(_ROTARY_CACHE) > 64:  # many distinct lengths (evaluation tails): keep it bounded
            _ROTARY_CACHE.clear()
        _ROTARY_CACHE[key] = (cos, sin)
    return cos, sin


def _rotary_tables(
    seq_len: int, rotary_dim: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    inv_freq = inv_freq.to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin = torch.cat((-sin[:, : rotary_dim // 2], sin[:, rotary_dim // 2 :]), dim=-1)
    # (T, 1, 1, rot): broadcasts over heads and over the stacked (q, k) axis
    return emb.cos().to(dtype)[:, None, None, :], sin.to(dtype)[:, None, None, :]


def _apply_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk: (B, T, H, 2, head_dim), q and k stacked; rotates the first cos.shape[-1] dims of every head
    (GPT-NeoX rotate_half), both q and k in one pass."""
    rot = cos.shape[-1]
    if rot == 0:
        return qk
    x_rot, x_pass = qk[..., :rot], qk[..., rot:]
    # rotate_half(x) * sin == roll(x, half) * sign-folded sin
    x_rot = x_rot * cos + torch.roll(x_rot, rot // 2, dims=-1) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.use_flash_attn = cfg.use_flash_attn and _flash_attn_func is not None
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # HF layout: the fused projection is [q, k, v] per head, not [all q, all k, all v].
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3, self.head_dim)
        qk = _apply_rotary(qkv[..., :2, :], cos, sin)
        q, k, v = qk[..., 0, :], qk[..., 1, :], qkv[..., 2, :]  # each (B, T, H, hd)
        if self.use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = _flash_attn_func(q, k, v.contiguous(), dropout_p=0.0, causal=True)  # (B, T, H, hd)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        return self.dense(out.reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.dense_4h_to_h = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pythia's hidden_act "gelu" is the exact (erf) GELU, not the tanh approximation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin)
        if self.parallel_residual:
            # same summation order as HF, so fp32 results agree to rounding
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        h = attn + x
        return self.mlp(self.post_attention_layernorm(h)) + h


class Backbone(nn.Module):
    """HF's `GPTNeoXModel` (the `gpt_neox.` prefix of the checkpoint)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.n_layer)])
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_in(input_ids)
        # cast once per forward to the activations' dtype (bf16 under autocast), as HF casts per layer,
        # so q/k stay in half precision for the attention kernel
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cos, sin = _rotary_cos_sin(
            input_ids.shape[1], self.cfg.rotary_dim, float(self.cfg.rotary_base), x.device, dtype
        )
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_layer_norm(x)


class GPTNeoX(nn.Module):
    """Pythia-architecture causal LM; `state_dict()` keys are HF `GPTNeoXForCausalLM` checkpoint keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = Backbone(config)
        self.embed_out = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied, as Pythia
        self.apply(self._init_weights)
        global _FLASH_WARNED
        if config.use_flash_attn and _flash_attn_func is None and not _FLASH_WARNED:
            _FLASH_WARNED = True
            log.warning("use_flash_attn=True but flash_attn is not installed; using torch SDPA attention")

    def _init_weights(self, module: nn.Module) -> None:
        # as HF GPTNeoXPreTrainedModel._init_weights; uses the global RNG, so callers seed it
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V) and/or per-token loss (B, T) against `targets`.

        `return_logits` defaults to True only when no targets are given (the full logits tensor
        is large at paper scale: 8 x 2048 x 50304). Targets equal to -100 get loss 0.
        """
        T = input_ids.shape[1]
        if T > self.config.context_length:
            raise ValueError(f"sequence length {T} exceeds model.context_length={self.config.context_length}")
        if return_logits is None:
            return_logits = targets is None
        logits = self.embed_out(self.gpt_neox(input_ids))
        token_loss = None
        if targets is not None:
            # fp32 cross entropy: bf16 log-softmax over 50k classes loses too much precision
            token_loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="none",
                ignore_index=IGNORE_INDEX,
            ).view(targets.shape)
        return ModelOutput(logits=logits if return_logits else None, token_loss=token_loss)

    def num_parameters(self, exclude_input_embedding: bool = False) -> int:
        """All parameters; optionally without embed_in (a lookup, no FLOPs). embed_out (a matmul) counts."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_input_embedding:
            n -= self.gpt_neox.embed_in.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 * N + 12 * n_layer * d_model * seq_len.

        The PaLM (Chowdhery et al. 2022, App. B) / Chinchilla estimate used for MFU. N counts every
        parameter that takes part in a matmul, i.e. all but the input embedding (a lookup); the
        untied output projection is included. The second term is the attention score and value
        products (QK^T and AV, forward 2 * 2 * T * d per layer, x3 for backward), counted without
        halving for the causal mask, as the standard formula does.
        """
        cfg = self.config
        n_matmul = self.num_parameters(exclude_input_embedding=True)
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * int(seq_len)

    # -- HF checkpoint interop ------------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a `GPTNeoXForCausalLM` state dict (checkpoint `embed_out.` or transformers-5 `lm_head.`)."""
        sd = {}
        for key, value in state_dict.items():
            # non-learned buffers that some checkpoints carry (causal mask, rotary inv_freq)
            if key.endswith((".attention.bias", ".attention.masked_bias", "inv_freq")):
                continue
            if key.startswith("lm_head."):
                key = "embed_out." + key[len("lm_head.") :]
            sd[key] = value
        self.load_state_dict(sd, strict=strict)

    def to_hf_state_dict(self, head_name: str = "embed_out") -> dict[str, torch.Tensor]:
        """Our state dict in HF naming; head_name="lm_head" for transformers >= 5 module names."""
        sd = self.state_dict()
        if head_name != "embed_out":
            n = len("embed_out")
            sd = {(head_name + k[n:] if k.startswith("embed_out.") else k): v for k, v in sd.items()}
        return dict(sd)


def lm_token_losses(model: nn.Module, input_ids: torch.Tensor, dynamic_batch: bool = False) -> torch.Tensor:
    """Next-token losses (B, T-1) in fp32: position t predicts token t+1 from tokens 0..t.

    Works with a torch.compile'd GPTNeoX too (it only calls the module). `dynamic_batch`: batches of
    many sizes share one compiled graph with a dynamic batch dimension (a compiled model is otherwise
    specialised to each batch size it sees, up to Dynamo's recompile limit).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (B, T) with T >= 2, got shape {tuple(input_ids.shape)}")
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    if dynamic_batch:
        torch._dynamo.maybe_mark_dynamic(inputs, 0)
        torch._dynamo.maybe_mark_dynamic(targets, 0)
    out = model(inputs, targets=targets, return_logits=False)
    return out.token_loss


def load_decoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Decoder weights from a Lightning .ckpt (keys `model.*`) or a plain decoder state_dict."""
    # Our own checkpoint (it also holds callback/optimizer state), so a full unpickle is acceptable.
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    lightning = isinstance(ckpt, dict) and "state_dict" in ckpt
    state = ckpt["state_dict"] if lightning else ckpt
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if lightning and not k.startswith("model."):
            continue  # the module's own buffers, not the decoder's
        k = k.removeprefix("model.").replace("_orig_mod.", "")  # torch.compile wraps the decoder
        out[k] = v
    if not out:
        raise ValueError(f"checkpoint {path} holds no decoder weights (no `model.*` keys)")
    return out


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> GPTNeoX:
    """A freshly initialised GPTNeoX from a ModelConfig, dict or DictConfig (a `_target_` key is ignored)."""
    if not isinstance(cfg, ModelConfig):
        try:  # a DictConfig: resolve interpolations into plain values
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        names = {f.name for f in fields(ModelConfig)}
        kwargs = {k: v for k, v in dict(cfg).items() if k != "_target_"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"model: unknown field(s) {unknown}; allowed: {sorted(names)}")
        cfg = ModelConfig(**kwargs)
    return GPTNeoX(cfg)


def config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain-dict form (for logging and checkpoints)."""
    return asdict(cfg)


__all__ = [
    "IGNORE_INDEX",
    "GPTNeoX",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "config_dict",
    "lm_token_losses",
]
