"""Learning-rate schedulers (MXNet's factor, multifactor, poly and cosine), each with warmup.

A scheduler is a validated pydantic config nested in an optimizer config, e.g.
``{'type': 'factor', 'step': 10, 'factor': 0.5}``.  The learning rate is a pure function of the
update count ``num_update`` (MXNet's schedulers keep a little state, but give the same values when
``num_update`` only grows, which is how an optimizer drives them), so a checkpoint needs nothing
from the scheduler but the count.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SchedulerBase(BaseModel):
    """Options every scheduler has: the base learning rate and the warmup."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    base_lr: float = Field(0.01, ge=0, description="learning rate after warmup (the optimizer's learning_rate, "
                                                   "when given, replaces it)")
    warmup_steps: int = Field(0, ge=0, description="updates spent warming up before the schedule starts")
    warmup_begin_lr: float = Field(0.0, ge=0, description="learning rate at the first warmup update")
    warmup_mode: Literal["linear", "constant"] = "linear"

    @model_validator(mode="after")
    def _check_warmup(self):
        if self.warmup_steps and self.warmup_begin_lr > self.base_lr:
            raise ValueError(f"warmup_begin_lr ({self.warmup_begin_lr}) must not exceed base_lr ({self.base_lr})")
        return self

    def warmup_lr(self, num_update: int, base_lr: float) -> float:
        if self.warmup_mode == "constant":
            return self.warmup_begin_lr
        return self.warmup_begin_lr + (base_lr - self.warmup_begin_lr) * num_update / self.warmup_steps

    def __call__(self, num_update: int, base_lr: float | None = None) -> float:
        """The learning rate after ``num_update`` updates (``base_lr`` overrides the config's)."""
        base = self.base_lr if base_lr is None else base_lr
        if num_update < self.warmup_steps:
            return self.warmup_lr(num_update, base)
        return self.decayed(num_update, base)

    def decayed(self, num_update: int, base_lr: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class FactorScheduler(SchedulerBase):
    """``base_lr * factor ** floor((num_update - 1) / step)``, never below ``stop_factor_lr`` once it
    has decayed (MXNet's FactorScheduler)."""

    type: Literal["factor"] = "factor"
    step: int = Field(..., ge=1, description="updates between two decays")
    factor: float = Field(1.0, gt=0, le=1, description="multiplier applied every `step` updates")
    stop_factor_lr: float = Field(1e-8, ge=0, description="the decay stops at this learning rate")

    def decayed(self, num_update: int, base_lr: float) -> float:
        k = max(0, (num_update - 1) // self.step)
        if k == 0:
            return base_lr
        return max(base_lr * self.factor ** k, self.stop_factor_lr)


class MultiFactorScheduler(SchedulerBase):
    """``base_lr * factor ** k`` where ``k`` counts the steps below ``num_update``."""

    type: Literal["multifactor"] = "multifactor"
    step: list[Annotated[int, Field(ge=1)]] = Field(..., min_length=1, description="increasing update counts "
                                                                                   "at which the rate decays")
    factor: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _increasing(self):
        for a, b in zip(self.step, self.step[1:]):
            if b <= a:
                raise ValueError(f"step must be strictly increasing; got {self.step}")
        return self

    def decayed(self, num_update: int, base_lr: float) -> float:
        k = sum(1 for s in self.step if num_update > s)
        return base_lr * self.factor ** k


class _ToMaxUpdate(SchedulerBase):
    max_update: int = Field(..., ge=1, description="update count at which the rate reaches final_lr")
    final_lr: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _after_warmup(self):
        if self.max_update <= self.warmup_steps:
            raise ValueError(f"max_update ({self.max_update}) must exceed warmup_steps ({self.warmup_steps})")
        return self

    def fraction(self, num_update: int) -> float:
        return (min(num_update, self.max_update) - self.warmup_steps) / (self.max_update - self.warmup_steps)


class PolyScheduler(_ToMaxUpdate):
    """``final_lr + (base_lr - final_lr) * (1 - fraction) ** pwr`` after warmup."""

    type: Literal["poly"] = "poly"
    pwr: float = Field(2.0, ge=0, description="power of the decay")

    def decayed(self, num_update: int, base_lr: float) -> float:
        return self.final_lr + (base_lr - self.final_lr) * (1.0 - self.fraction(num_update)) ** self.pwr


class CosineScheduler(_ToMaxUpdate):
    """``final_lr + (base_lr - final_lr) * (1 + cos(pi * fraction)) / 2`` after warmup."""

    type: Literal["cosine"] = "cosine"

    def decayed(self, num_update: int, base_lr: float) -> float:
        return self.final_lr + (base_lr - self.final_lr) * (1.0 + math.cos(math.pi * self.fraction(num_update))) / 2


SchedulerConfig = Annotated[
    Union[FactorScheduler, MultiFactorScheduler, PolyScheduler, CosineScheduler],
    Field(discriminator="type"),
]

SCHEDULERS = {"factor": FactorScheduler, "multifactor": MultiFactorScheduler, "poly": PolyScheduler,
              "cosine": CosineScheduler}

__all__ = ["SchedulerConfig", "SchedulerBase", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler",
           "CosineScheduler", "SCHEDULERS"]
