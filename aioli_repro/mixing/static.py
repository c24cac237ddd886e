"""The two fixed mixtures: stratified (uniform over groups) and static (any given proportions)."""

from __future__ import annotations

from collections.abc import Sequence

from aioli_repro.data.sampler import validate_proportions
from aioli_repro.mixing.base import MixingContext, MixingMethod


class Stratified(MixingMethod):
    """p_i = 1/m for the whole run: the paper's baseline."""

    name = "stratified"


class Static(MixingMethod):
    """A fixed mixture given in config (grid points, DML/DoReMi/DoGE final runs, one-hot graph runs)."""

    name = "static"

    def __init__(
        self, proportions: Sequence[float] | dict[str, float], composition: str = "multinomial"
    ) -> None:
        self.given = proportions
        self._composition = composition

    def setup(self, ctx: MixingContext) -> None:
        super().setup(ctx)
        given = self.given
        if isinstance(given, dict) or hasattr(given, "keys"):
            unknown = sorted(set(given.keys()) - set(ctx.groups))
            if unknown:
                raise ValueError(
                    f"method.proportions: unknown groups {unknown}; the run's groups are {ctx.groups}"
                )
            given = [float(given.get(g, 0.0)) for g in ctx.groups]
        self._p = validate_proportions(list(given), ctx.m, field="method.mixer.proportions")

    def composition(self) -> str:
        return self._composition
