"""An in-process plugin for the config-file tests: a store that can compress, a compressor and an
optimizer with a nested lr_scheduler, so these tests do not depend on the other distributions."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import kvframe
from kvframe.backend import COMPLETED, StoreBackend
from kvframe.config import CompressionConfig, OptimizerConfig, StoreConfig

CREATED: list = []  # every store this plugin created, so tests can see whether one was made
CLOSED: list = []


class CfgStoreConfig(StoreConfig):
    type: Literal["cfgtest_store"] = "cfgtest_store"
    slots: int = Field(4, ge=1, le=64, description="a bounded option")


class CfgStore(StoreBackend):
    capabilities = frozenset({"optimizer", "compression"})

    def __init__(self, config):
        super().__init__(config)
        self.values, self.updater, self.compressor = {}, None, None
        CREATED.append(self)

    def init(self, keys, values):
        for k, v in zip(keys, values):
            self.values[k] = np.array(v, copy=True)

    def push(self, keys, values, priority=0):
        for k, vals in zip(keys, values):
            merged = np.sum(vals, axis=0)
            if self.updater is None:
                self.values[k][...] = merged
            else:
                self.updater(k, merged, self.values[k])

    def pull(self, keys, outs, priority=0, ignore_sparse=True):
        for k, os_ in zip(keys, outs):
            for o in os_:
                o[...] = self.values[k]
        return COMPLETED

    def set_updater(self, updater):
        self.updater = updater

    def set_gradient_compression(self, compressor):
        if compressor.config.threshold > 100:
            raise RuntimeError("threshold refused by the backend")
        self.compressor = compressor

    def close(self):
        CLOSED.append(self)


class CfgCompression(CompressionConfig):
    type: Literal["cfgtest_2bit"] = "cfgtest_2bit"
    threshold: float = Field(0.5, gt=0)


class Compressor:
    def __init__(self, config):
        self.config = config


class FactorScheduler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["factor"] = "factor"
    step: int = Field(ge=1)
    factor: float = Field(1.0, gt=0, le=1)


class CfgSGD(OptimizerConfig):
    type: Literal["cfgtest_sgd"] = "cfgtest_sgd"
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: FactorScheduler | None = None


class Optimizer:
    def __init__(self, config):
        self.config = config

    def create_updater(self):
        lr = self.config.learning_rate

        def update(key, grad, weight):
            weight -= lr * grad

        return update


@kvframe.hookimpl
def kvframe_register_stores(register):
    register("cfgtest_store", CfgStore, CfgStoreConfig)


@kvframe.hookimpl
def kvframe_register_compressors(register):
    register("cfgtest_2bit", Compressor, CfgCompression)


@kvframe.hookimpl
def kvframe_register_optimizers(register):
    register("cfgtest_sgd", Optimizer, CfgSGD)
