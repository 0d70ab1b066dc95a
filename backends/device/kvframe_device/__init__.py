"""kvframe plugin: store 'device' (MXNet's CommDevice: each key reduced on its least-loaded device)."""

from kvframe import hookimpl
from kvframe_device.store import DeviceConfig, DeviceStore


@hookimpl
def kvframe_register_stores(register):
    register("device", DeviceStore, DeviceConfig)


__all__ = ["DeviceStore", "DeviceConfig"]
