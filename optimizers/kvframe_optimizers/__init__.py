"""kvframe plugin: optimizers (Apache MXNet 1.9.1's registry, plus adamw, adabelief and lans from
MXNet 2.0), learning-rate schedulers and the updater with safe checkpoints.

Every optimizer is registered through the ``kvframe_register_optimizers`` hook and has its own entry
point in the ``kvframe.optimizers`` group, so ``kv.set_optimizer('adam', learning_rate=0.01)``
validates the options with :class:`AdamConfig` and runs :class:`Adam`.
"""

from kvframe import hookimpl
from kvframe_optimizers import configs
from kvframe_optimizers.base import KeyState, Optimizer
from kvframe_optimizers.checkpoint import StatesFormatError
from kvframe_optimizers.configs import *  # noqa: F403 - the config models
from kvframe_optimizers.engine import kernel_backend
from kvframe_optimizers.rules import RULES, create, create_optimizer
from kvframe_optimizers.schedulers import (
    CosineScheduler,
    FactorScheduler,
    MultiFactorScheduler,
    PolyScheduler,
    SchedulerConfig,
)
from kvframe_optimizers.updater import Updater


@hookimpl
def kvframe_register_optimizers(register):
    for name, (_, config_model) in RULES.items():
        register(name, create, config_model)


__all__ = ["RULES", "create", "create_optimizer", "Optimizer", "KeyState", "Updater", "StatesFormatError",
           "SchedulerConfig", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler",
           "configs", "kernel_backend"]
