"""kvframe plugin: distributed stores 'dist_sync', 'dist_device_sync' and 'dist_async'.

Roles: ``python -m kvframe_dist --role scheduler|server`` (or ``python -m kvframe_dist.server``,
``python -m kvframe_dist.scheduler``); jobs start with ``kvframe-launch -n W -s S -- CMD...``.
The layers, one job per module, are described in backends/dist/README.md.
"""

from kvframe import hookimpl
from kvframe_dist.configs import DistAsyncConfig, DistDeviceSyncConfig, DistSyncConfig
from kvframe_dist.worker import DistAsyncStore, DistDeviceSyncStore, DistSyncStore


@hookimpl
def kvframe_register_stores(register):
    register("dist_sync", DistSyncStore, DistSyncConfig)
    register("dist_device_sync", DistDeviceSyncStore, DistDeviceSyncConfig)
    register("dist_async", DistAsyncStore, DistAsyncConfig)


__all__ = ["DistSyncStore", "DistDeviceSyncStore", "DistAsyncStore"]
