"""The options of the dist stores (``kvframe.create('dist_sync', **options)``), validated by pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvframe.config import StoreConfig


class DistConfig(StoreConfig):
    timeout: float | None = Field(None, gt=0, description="seconds any wait may take (default KVFRAME_TIMEOUT or "
                                                          "120)")
    bigarray_bound: int | None = Field(None, ge=1, description="arrays of at least this many elements are split over "
                                                               "all servers (default 1,000,000 or "
                                                               "KVFRAME_BIGARRAY_BOUND)")
    transport: str | None = Field(None, min_length=1, description="the transport plugin of the job (default "
                                                                  "KVFRAME_TRANSPORT, else shm); every node of a job "
                                                                  "uses the same")
    reduce_threads: int | None = Field(None, ge=1, le=256, description="threads for the local reduce")
    compress_pulls: bool = Field(False, description="with gradient compression set (a compressor with a threshold, "
                                                    "such as 2bit), pulls are compressed too: each pull after the "
                                                    "first carries the compressed difference between the server's "
                                                    "value and the worker's copy, or the value itself when one step "
                                                    "cannot bring the copy within the threshold")


class DistSyncConfig(DistConfig):
    type: Literal["dist_sync"] = "dist_sync"


class DistDeviceSyncConfig(DistConfig):
    type: Literal["dist_device_sync"] = "dist_device_sync"


class DistAsyncConfig(DistConfig):
    type: Literal["dist_async"] = "dist_async"
