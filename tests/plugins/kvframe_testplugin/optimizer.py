"""Optimizer 'halfsign': ``w -= lr * sign(g)``, with a step counter per key as its only state.
What a third party writes to add an optimizer (no dependency on kvframe-optimizers)."""

import io
import json
from typing import Literal

import numpy as np
from pydantic import Field

import kvframe
from kvframe.config import OptimizerConfig


class HalfSignConfig(OptimizerConfig):
    type: Literal["halfsign"] = "halfsign"
    learning_rate: float = Field(0.01, gt=0)


class HalfSignUpdater:
    def __init__(self, config):
        self.config = config
        self.steps = {}

    def __call__(self, key, grad, weight):
        self.steps[key] = self.steps.get(key, 0) + 1
        weight -= self.config.learning_rate * np.sign(grad)

    def get_states(self, dump_optimizer=False):
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(sorted(self.steps.items())).encode(), np.uint8))
        return buf.getvalue()

    def set_states(self, data):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            self.steps = {k: v for k, v in json.loads(bytes(z["meta"]).decode())}


class HalfSign:
    def __init__(self, config):
        self.config = config

    def create_updater(self):
        return HalfSignUpdater(self.config)


@kvframe.hookimpl
def kvframe_register_optimizers(register):
    register("halfsign", HalfSign, HalfSignConfig)
