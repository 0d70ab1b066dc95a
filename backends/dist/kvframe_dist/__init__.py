"""kvframe plugin: distributed stores 'dist_sync', 'dist_device_sync', 'dist_async' and transport 'zmq'.

Roles: ``python -m kvframe_dist --role scheduler|server`` (or ``python -m kvframe_dist.server``,
``python -m kvframe_dist.scheduler``); jobs start with ``kvframe-launch -n W -s S -- CMD...``.
"""

from kvframe import hookimpl
from kvframe_dist.store import (
    DistAsyncConfig,
    DistAsyncStore,
    DistDeviceSyncConfig,
    DistDeviceSyncStore,
    DistSyncConfig,
    DistSyncStore,
)
from kvframe_dist.transport import ZmqConfig, ZmqTransport, make_transport


@hookimpl
def kvframe_register_stores(register):
    register("dist_sync", DistSyncStore, DistSyncConfig)
    register("dist_device_sync", DistDeviceSyncStore, DistDeviceSyncConfig)
    register("dist_async", DistAsyncStore, DistAsyncConfig)


@hookimpl
def kvframe_register_transports(register):
    register("zmq", make_transport, ZmqConfig)


__all__ = ["DistSyncStore", "DistDeviceSyncStore", "DistAsyncStore", "ZmqTransport", "ZmqConfig"]
