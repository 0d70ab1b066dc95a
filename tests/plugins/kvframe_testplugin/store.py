"""Store 'listsum': keeps each key's value in a dict and sums pushes with a plain loop.

Small on purpose: it is what a third party writes to add a store, and it runs kvframe's
conformance suite like the built-in stores do.
"""

from typing import Literal

import numpy as np

import kvframe
from kvframe.backend import COMPLETED, StoreBackend
from kvframe.config import StoreConfig


class ListSumConfig(StoreConfig):
    type: Literal["listsum"] = "listsum"


class ListSumStore(StoreBackend):
    capabilities = frozenset({"optimizer"})

    def __init__(self, config):
        super().__init__(config)
        self.values = {}
        self.updater = None

    def init(self, keys, values):
        for k, v in zip(keys, values):
            self.values[k] = np.array(v, copy=True)

    def push(self, keys, values, priority=0):
        merged = {}
        for k, vals in zip(keys, values):
            for v in vals:
                merged[k] = merged[k] + v if k in merged else np.array(v, copy=True)
        for k, m in merged.items():
            if self.updater is None:
                self.values[k][...] = m
            else:
                self.updater(k, m, self.values[k])

    def pull(self, keys, outs, priority=0, ignore_sparse=True):
        for k, os_ in zip(keys, outs):
            for o in os_:
                o[...] = self.values[k]
        return COMPLETED

    def set_updater(self, updater):
        self.updater = updater


@kvframe.hookimpl
def kvframe_register_stores(register):
    register("listsum", ListSumStore, ListSumConfig)
