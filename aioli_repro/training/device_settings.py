"""Every setting where a run on a CUDA GPU differs from one on the CPU, resolved in one place.

`trainer=gpu` and `trainer=default` on a GPU node give bf16-mixed precision, the fused AdamW kernel,
TF32 for the fp32 matmuls left outside autocast, and optionally torch.compile and flash-attn. Each of
these can be asked for on the CPU too (`trainer=gpu trainer.accelerator=cpu`, or one key at a time),
which is how the test suite trains the GPU configuration on a machine without one
(tests/test_gpu_settings_on_cpu.py). `make gpu-check` reports the resolved settings of a node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig

# Lightning precision -> the autocast dtype of its forward passes (None: no autocast)
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class DeviceSettings:
    """What one run trains with. Every field is resolved: no "auto" is left."""

    accelerator: str  # the device type the run trains on: "cuda" or "cpu" (or Lightning's others)
    precision: str  # Lightning's precision plugin: "bf16-mixed" on CUDA by default, "32-true" on CPU
    fused_adamw: bool  # torch's fused AdamW step (one kernel): CUDA by default, CPU when asked
    tf32: bool  # TF32 for fp32 matmuls outside autocast: CUDA mixed-precision runs by default
    compile: bool  # torch.compile the decoder (train.compile)
    flash_attn: bool  # model.use_flash_attn, flash-attn installed, and a CUDA half-precision run
    # the training step never reads a device value on the host: a non-finite loss is found at the next
    # log point or checkpoint (CUDA; the tests force it on CPU), instead of before the update (CPU)
    sync_free: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype training's forward passes run in, which evaluation uses too (None: fp32)."""
        return _AUTOCAST.get(self.precision)

    @property
    def grad_scaler(self) -> bool:
        """fp16 needs loss scaling (Lightning's plugin owns the scaler; clipping must unscale first)."""
        return self.precision == "16-mixed"

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_accelerator(value: str) -> str:
    """`trainer.accelerator` as the device type a run trains on ("auto": CUDA when there is one)."""
    value = str(value)
    if value in ("gpu", "cuda"):
        return "cuda"
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def resolve_precision(value: str, accelerator: str) -> str:
    """`trainer.precision`; "auto" is bf16-mixed on CUDA and full fp32 elsewhere."""
    if str(value) == "auto":
        return "bf16-mixed" if accelerator == "cuda" else "32-true"
    return str(value)


def _auto(value: object, default: bool) -> bool:
    return default if value is None or value == "auto" else bool(value)


def _flash_attn_installed() -> bool:
    from aioli_repro.model import _flash_attn_func

    return _flash_attn_func is not None


def resolve_device_settings(cfg: DictConfig) -> DeviceSettings:
    """The settings a run of `cfg` trains with on this machine (config validated before)."""
    tr, t = cfg.trainer, cfg.train
    accelerator = resolve_accelerator(tr.accelerator)
    precision = resolve_precision(tr.precision, accelerator)
    cuda = accelerator == "cuda"
    mixed = precision in _AUTOCAST
    return DeviceSettings(
        accelerator=accelerator,
        precision=precision,
        fused_adamw=_auto(tr.get("fused_optimizer"), cuda),
        tf32=_auto(tr.get("tf32"), cuda and mixed),
        compile=bool(t.get("compile") or False),
        flash_attn=bool(cfg.model.get("use_flash_attn")) and cuda and mixed and _flash_attn_installed(),
        sync_free=cuda,
    )


def apply_process_settings(settings: DeviceSettings) -> None:
    """Process-wide switches: TF32 matmuls on CUDA (no effect, and left alone, on a CPU-only run)."""
    if settings.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
