"""kvframe plugin: store 'local' (CPU reduce over a thread pool)."""

from kvframe import hookimpl
from kvframe_local.store import LocalConfig, LocalStore


@hookimpl
def kvframe_register_stores(register):
    register("local", LocalStore, LocalConfig)


__all__ = ["LocalStore", "LocalConfig"]
