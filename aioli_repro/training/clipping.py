"""Gradient clipping that works with fused optimizers under every precision.

Lightning's mixed-precision plugin (2.6.6 and earlier) refuses to clip for any optimizer that unscales
gradients inside its own step, fused AdamW among them, even under bf16-mixed where there is no grad
scaler at all (lightning#21435; fixed on its main branch by #21436, in no release yet). So MixingLM
clips here, from `configure_gradient_clipping`, and never calls the plugin's `clip_gradients`. That
works the same on releases with and without the upstream change.

With a grad scaler (16-mixed) the gradients are unscaled first, once: Lightning does not unscale for a
fused optimizer (its step would), and GradScaler.step then passes the fused step no scale to undo,
only the found-inf flag, so an overflowing step is still skipped. The bench's plain loop calls the same
function.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState


def _unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """`scaler.unscale_(optimizer)` unless this step's gradients were unscaled already (by Lightning,
    for an unfused optimizer, or by a release that unscales fused ones too)."""
    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def clip_gradients_(
    optimizer: torch.optim.Optimizer,
    clip_val: float | None,
    algorithm: str | None = "norm",
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Clip the gradients of `optimizer`'s parameters in place: by their global L2 norm ("norm") or
    elementwise ("value"; None: "norm", Lightning's default). No-op when `clip_val` is 0 or None.
    No host-device synchronisation."""
    if not clip_val:
        return
    if scaler is not None and scaler.is_enabled():
        _unscale_once(scaler, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    algorithm = "norm" if algorithm is None else str(getattr(algorithm, "value", algorithm))
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, float(clip_val))
    elif algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, float(clip_val))
    else:
        raise ValueError(f"gradient clipping algorithm {algorithm!r}: expected 'norm' or 'value'")
