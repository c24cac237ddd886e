"""Mixing methods: one interface (`base.MixingMethod`), one small class per method."""

from aioli_repro.mixing.base import Batch, MixingContext, MixingMethod, StepStats
from aioli_repro.mixing.static import Static, Stratified

__all__ = ["Batch", "MixingContext", "MixingMethod", "StepStats", "Static", "Stratified"]
