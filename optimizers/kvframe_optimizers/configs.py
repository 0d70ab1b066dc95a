"""One pydantic model per optimizer: MXNet's hyperparameters, defaults and bounds.

Every model subclasses :class:`kvframe.config.OptimizerConfig` (``extra='forbid'``), so an unknown
or misspelt option is refused with an error naming it, before anything is applied.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import ConfigDict, Field, model_validator

from kvframe.config import OptimizerConfig
from kvframe_optimizers.schedulers import SchedulerConfig

Key = Union[int, str]
Mult = Annotated[float, Field(ge=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Eps = Annotated[float, Field(gt=0)]


class BaseOptimizerConfig(OptimizerConfig):
    """The options every optimizer takes (MXNet's ``Optimizer`` base class)."""

    model_config = ConfigDict(allow_inf_nan=False)

    learning_rate: Optional[float] = Field(
        None, ge=0, description="initial learning rate; None: the scheduler's base_lr, or 0.01 without one")
    wd: float = Field(0.0, ge=0, description="weight decay (L2) coefficient")
    rescale_grad: float = Field(1.0, gt=0, description="gradients are multiplied by this first (often 1/batch)")
    clip_gradient: Optional[float] = Field(None, gt=0, description="clip gradients into [-c, c]; None: no clip")
    lr_scheduler: Optional[SchedulerConfig] = Field(None, description="learning-rate schedule")
    multi_precision: bool = Field(False, description="update float16 weights through a float32 master copy")
    begin_num_update: int = Field(0, ge=0, description="update count to start from")
    lr_mult: dict[Key, Mult] = Field(default_factory=dict, description="per key or name learning-rate multiplier")
    wd_mult: dict[Key, Mult] = Field(default_factory=dict, description="per key or name weight-decay multiplier")
    param_idx2name: dict[Key, str] = Field(
        default_factory=dict, description="key -> parameter name; names ending in neither _weight nor _gamma "
                                          "get no weight decay")

    @model_validator(mode="after")
    def _check_warmup_against_lr(self):
        s = self.lr_scheduler
        if s is not None and self.learning_rate is not None and s.warmup_steps \
                and s.warmup_begin_lr > self.learning_rate:
            raise ValueError(f"lr_scheduler.warmup_begin_lr ({s.warmup_begin_lr}) must not exceed learning_rate "
                             f"({self.learning_rate}), which replaces the scheduler's base_lr")
        return self


class SGDConfig(BaseOptimizerConfig):
    type: Literal["sgd"] = "sgd"
    momentum: Beta = 0.0
    lazy_update: bool = Field(True, description="row-sparse gradients update only their rows")


class CCSGDConfig(SGDConfig):
    """Deprecated alias of sgd (as in MXNet 1.9.1)."""

    type: Literal["ccsgd"] = "ccsgd"  # type: ignore[assignment]


class NAGConfig(BaseOptimizerConfig):
    type: Literal["nag"] = "nag"
    momentum: Beta = 0.0


class SignumConfig(BaseOptimizerConfig):
    type: Literal["signum"] = "signum"
    learning_rate: Optional[float] = Field(0.01, ge=0)
    momentum: Beta = 0.9
    wd_lh: float = Field(0.0, ge=0, description="decoupled weight decay")


class FTMLConfig(BaseOptimizerConfig):
    type: Literal["ftml"] = "ftml"
    beta1: Beta = 0.6
    beta2: Beta = 0.999
    epsilon: Eps = 1e-8


class LARSConfig(BaseOptimizerConfig):
    type: Literal["lars"] = "lars"
    momentum: Beta = 0.0
    lazy_update: bool = True
    eta: float = Field(0.001, ge=0, description="LARS coefficient")
    eps: float = Field(0.0, ge=0, description="added to the trust-ratio denominator")
    momentum_correction: bool = True


class LBSGDConfig(BaseOptimizerConfig):
    type: Literal["lbsgd"] = "lbsgd"
    momentum: Beta = 0.0
    warmup_strategy: Literal["linear", "power2", "sqrt", "lars"] = "linear"
    warmup_epochs: int = Field(5, ge=0)
    batch_scale: int = Field(1, ge=1, description="gradients of this many pushes are averaged per update")
    updates_per_epoch: int = Field(32, ge=1)
    begin_epoch: int = Field(0, ge=0)
    num_epochs: int = Field(60, ge=1)


class _BoundsConfig(BaseOptimizerConfig):
    lower_bound: Optional[float] = Field(None, gt=0, description="lower clamp of the weight norm")
    upper_bound: Optional[float] = Field(None, gt=0, description="upper clamp of the weight norm")

    @model_validator(mode="after")
    def _check_bounds(self):
        lo, hi = self.lower_bound, self.upper_bound
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"lower_bound ({lo}) must not exceed upper_bound ({hi})")
        return self


class LAMBConfig(_BoundsConfig):
    type: Literal["lamb"] = "lamb"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999
    epsilon: Eps = 1e-6
    bias_correction: bool = True


class DCASGDConfig(BaseOptimizerConfig):
    type: Literal["dcasgd"] = "dcasgd"
    momentum: Beta = 0.0
    lamda: float = Field(0.04, ge=0, description="delay-compensation scale")


class SGLDConfig(BaseOptimizerConfig):
    type: Literal["sgld"] = "sgld"
    seed: Optional[int] = Field(None, ge=0, description="seed of the noise generator (kvframe extension)")


class AdamConfig(BaseOptimizerConfig):
    type: Literal["adam"] = "adam"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999
    epsilon: Eps = 1e-8
    lazy_update: bool = True


class AdaGradConfig(BaseOptimizerConfig):
    type: Literal["adagrad"] = "adagrad"
    eps: Eps = 1e-7


class RMSPropConfig(BaseOptimizerConfig):
    type: Literal["rmsprop"] = "rmsprop"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    gamma1: Beta = 0.9
    gamma2: Beta = 0.9
    epsilon: Eps = 1e-8
    centered: bool = False
    clip_weights: Optional[float] = Field(None, gt=0, description="clip weights into [-c, c]")


class AdaDeltaConfig(BaseOptimizerConfig):
    type: Literal["adadelta"] = "adadelta"
    rho: Beta = 0.9
    epsilon: Eps = 1e-5


class FtrlConfig(BaseOptimizerConfig):
    type: Literal["ftrl"] = "ftrl"
    learning_rate: Optional[float] = Field(0.1, ge=0)
    lamda1: float = Field(0.01, ge=0, description="L1 regularisation")
    beta: float = Field(1.0, ge=0)


class AdamaxConfig(BaseOptimizerConfig):
    type: Literal["adamax"] = "adamax"
    learning_rate: Optional[float] = Field(0.002, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999


class NadamConfig(BaseOptimizerConfig):
    type: Literal["nadam"] = "nadam"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999
    epsilon: Eps = 1e-8
    schedule_decay: float = Field(0.004, ge=0)


class GroupAdaGradConfig(BaseOptimizerConfig):
    type: Literal["groupadagrad"] = "groupadagrad"
    eps: Eps = 1e-5

    @model_validator(mode="after")
    def _no_wd(self):
        if self.wd != 0:
            raise ValueError(f"wd: weight decay is not supported by groupadagrad (got {self.wd})")
        return self


class TestConfig(BaseOptimizerConfig):
    """MXNet's 'test' optimizer: ``w += rescale_grad * g``."""

    __test__ = False  # not a pytest class
    type: Literal["test"] = "test"


class AdamWConfig(BaseOptimizerConfig):
    type: Literal["adamw"] = "adamw"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999
    epsilon: Eps = 1e-6
    correct_bias: bool = True


class AdaBeliefConfig(AdamWConfig):
    type: Literal["adabelief"] = "adabelief"  # type: ignore[assignment]


class LANSConfig(_BoundsConfig):
    type: Literal["lans"] = "lans"
    learning_rate: Optional[float] = Field(0.001, ge=0)
    beta1: Beta = 0.9
    beta2: Beta = 0.999
    epsilon: Eps = 1e-6
