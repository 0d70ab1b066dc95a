"""Finding and loading plugins.

Each kind has an entry-point group (``kvframe.stores``, ``kvframe.transports``,
``kvframe.compressors``, ``kvframe.optimizers``) whose entry-point names are the registered names
and whose values are plugin modules.  A lookup imports only the module that provides the name;
listing names imports nothing; a plugin that fails to import breaks only its own names.
``KVFRAME_DISABLE_PLUGINS`` (comma separated entry-point names or distribution names) blocks
plugins.  Modules can also be registered in-process with :func:`register_plugin`.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
import pydantic

from kvframe import hookspecs
from kvframe.config import PluginConfig, format_validation_error
from kvframe.errors import ConfigError, DuplicateRegistrationError, KVFrameError, PluginImportError, PluginNotFoundError

KINDS = {
    "stores": "kvframe_register_stores",
    "transports": "kvframe_register_transports",
    "compressors": "kvframe_register_compressors",
    "optimizers": "kvframe_register_optimizers",
}
OLD_HOOK_NAMES = {"kvframe_register_updaters": "optimizers"}  # still collected, with a DeprecationWarning

# Where the built-in names live, so a missing one can say what to install.
KNOWN_DISTRIBUTIONS = {
    "local": "kvframe-local",
    "device": "kvframe-device",
    "nccl": "kvframe-nccl",
    "dist_sync": "kvframe-dist",
    "dist_device_sync": "kvframe-dist",
    "dist_async": "kvframe-dist",
    "tcp": "kvframe-transports",
    "shm": "kvframe-transports",
    "zmq": "kvframe-transports",
}
KIND_DISTRIBUTIONS = {"compressors": "kvframe-compressors", "optimizers": "kvframe-optimizers"}


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[[Any], Any]
    config_model: type[PluginConfig]
    plugin: str  # the plugin (module) name that registered it
    distribution: str | None = None
    version: str | None = None


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
_failed: dict[str, str] = {}  # entry-point "group:name" -> reason it failed


def plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager("kvframe")
        _pm.add_hookspecs(hookspecs)
    return _pm


def _group(kind: str) -> str:
    return f"kvframe.{kind}"


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get("KVFRAME_DISABLE_PLUGINS", "").split(",") if n.strip()}


def _entry_points(kind: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=_group(kind)))


def _dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _is_blocked(ep: metadata.EntryPoint) -> bool:
    blocked = _disabled()
    dist, _ = _dist_of(ep)
    return ep.name in blocked or (dist is not None and dist in blocked)


def _reg_blocked(reg: Registration) -> bool:
    """A name an installed distribution registered is blocked by its own name or its distribution's,
    also when its module was imported for another name (one module often registers several)."""
    if reg.distribution is None:  # registered in-process
        return False
    blocked = _disabled()
    return reg.name in blocked or reg.distribution in blocked


def register_plugin(module: ModuleType | object, name: str | None = None,
                    distribution: str | None = None, version: str | None = None) -> None:
    """Register a plugin object in-process and collect everything it provides."""
    with _lock:
        pm = plugin_manager()
        pname = name or getattr(module, "__name__", None) or repr(module)
        if pm.get_plugin(pname) is None:
            pm.register(module, name=pname)
        for hook_name, kind in [(h, k) for k, h in KINDS.items()] + list(OLD_HOOK_NAMES.items()):
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name != pname:
                    continue

                def register(reg_name: str, factory: Callable[[Any], Any], config_model: type[PluginConfig],
                             _kind: str = kind) -> None:
                    _add(Registration(_kind, reg_name, factory, config_model, pname, distribution, version))

                impl.function(register=register)


def unregister_plugin(name: str) -> None:
    """Remove an in-process plugin and every name it registered (used by tests)."""
    with _lock:
        pm = plugin_manager()
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        for regs in _registry.values():
            for key in [k for k, r in regs.items() if r.plugin == name]:
                del regs[key]


def _add(reg: Registration) -> None:
    if not isinstance(reg.config_model, type) or not issubclass(reg.config_model, PluginConfig):
        raise TypeError(f"plugin {reg.plugin!r} registered {reg.kind[:-1]} {reg.name!r} with a config model that "
                        f"is not a kvframe.config.PluginConfig subclass: {reg.config_model!r}")
    regs = _registry[reg.kind]
    old = regs.get(reg.name)
    if old is not None and old.plugin != reg.plugin:
        raise DuplicateRegistrationError(
            f"{reg.kind[:-1]} {reg.name!r} is registered twice: by plugin {old.plugin!r} "
            f"({old.distribution or 'in-process'}) and by plugin {reg.plugin!r} ({reg.distribution or 'in-process'})")
    regs[reg.name] = reg


def _load_entry_point(kind: str, ep: metadata.EntryPoint) -> None:
    dist, version = _dist_of(ep)
    try:
        module = importlib.import_module(ep.value.split(":")[0])
    except Exception as exc:  # a broken plugin breaks only its own names
        reason = f"{type(exc).__name__}: {exc}"
        _failed[f"{_group(kind)}:{ep.name}"] = reason
        raise PluginImportError(
            f"{kind[:-1]} {ep.name!r} comes from distribution {dist or '?'} (module {ep.value}), "
            f"which failed to import: {reason}") from exc
    modname = ep.value.split(":")[0]
    try:
        register_plugin(module, name=modname, distribution=dist, version=version)
    except Exception as exc:  # its registration hook raised: it breaks only its own names too
        unregister_plugin(modname)  # no half-registered plugin stays behind
        reason = f"{type(exc).__name__}: {exc}"
        _failed[f"{_group(kind)}:{ep.name}"] = reason
        if isinstance(exc, KVFrameError):  # e.g. DuplicateRegistrationError, which says it all
            raise
        raise PluginImportError(
            f"{kind[:-1]} {ep.name!r} comes from distribution {dist or '?'} (module {ep.value}), whose "
            f"kvframe_register_* hook failed: {reason}") from exc


def lookup(kind: str, name: str) -> Registration:
    """The registration for ``name``, importing only the plugin that provides it."""
    regs = _registry[kind]
    reg = regs.get(name)
    if reg is not None and not _reg_blocked(reg):
        return reg
    with _lock:
        reg = regs.get(name)
        if reg is not None and not _reg_blocked(reg):
            return reg
        eps = [ep for ep in _entry_points(kind) if ep.name == name]
        blocked = [ep for ep in eps if _is_blocked(ep)]
        for ep in eps:
            if ep not in blocked and reg is None:
                _load_entry_point(kind, ep)
                if name in regs and not _reg_blocked(regs[name]):
                    return regs[name]
        installed = names(kind)
        if blocked or (reg is not None and _reg_blocked(reg)):
            disabled = os.environ.get("KVFRAME_DISABLE_PLUGINS")
            hint = f"it is installed but disabled by KVFRAME_DISABLE_PLUGINS={disabled!r}"
        else:
            dist = KNOWN_DISTRIBUTIONS.get(name)
            if dist is None and kind in KIND_DISTRIBUTIONS and not installed:
                dist = KIND_DISTRIBUTIONS[kind]
            hint = (f"install it with `pip install {dist}`" if dist else
                    f"install the distribution that provides it (entry point group '{_group(kind)}')")
        raise PluginNotFoundError(
            f"no {kind[:-1]} named {name!r}; installed: {', '.join(installed) or 'none'}; {hint}")


def names(kind: str) -> list[str]:
    """Every available name of ``kind`` without importing anything."""
    found = {ep.name for ep in _entry_points(kind) if not _is_blocked(ep)}
    found.update(n for n, r in _registry[kind].items() if not _reg_blocked(r))
    return sorted(found)


def load_all() -> dict[str, str]:
    """Import every installed plugin (for `kvframe plugins`); returns failures as 'group:name' -> reason."""
    for kind in KINDS:
        for ep in _entry_points(kind):
            if _is_blocked(ep) or ep.name in _registry[kind]:
                continue
            try:
                _load_entry_point(kind, ep)
            except KVFrameError:  # recorded in _failed
                pass
    return dict(_failed)


def registrations(kind: str) -> list[Registration]:
    return sorted((r for r in _registry[kind].values() if not _reg_blocked(r)), key=lambda r: r.name)


def create(kind: str, config: PluginConfig) -> Any:
    """Build the object a validated config describes."""
    return lookup(kind, config.type).factory(config)


# MXNet's historical names for store types, so existing scripts keep working.
STORE_ALIASES = {
    "local_allreduce_cpu": "local",
    "local_update_cpu": "local",
    "local_allreduce_device": "device",
    "dist": "dist_sync",
    "dist_sync_device": "dist_device_sync",
}


def store_name(name: str) -> str:
    """The registered store name ``name`` means: lowercased, MXNet's aliases resolved."""
    return STORE_ALIASES.get(name.lower(), name.lower())


def validate_plugin_config(kind: str, data: Any, what: str, source: str | None = None, **extra: Any) -> PluginConfig:
    """Turn a dict (with ``type``), a name, or a config model into a validated model of ``kind``.

    ``kind`` is a registry kind: 'stores', 'compressors', 'optimizers' or 'transports'.
    """
    if isinstance(data, PluginConfig):
        if extra:
            try:
                data = type(data).model_validate({**data.model_dump(), **extra})
            except pydantic.ValidationError as err:
                raise ConfigError(format_validation_error(err, what, source)) from None
        lookup(kind, data.type)  # the plugin must be installed
        return data
    if isinstance(data, str):
        data = {"type": data, **extra}
    elif isinstance(data, Mapping):
        data = {**data, **extra}
    else:
        raise ConfigError(f"{what} must be a dict with a 'type', a name or a config model; got {type(data).__name__}")
    if "type" not in data or not isinstance(data["type"], str):
        raise ConfigError(f"invalid {what}: field 'type' is required and must be a string naming one of "
                          f"{names(kind)}")
    reg = lookup(kind, data["type"].lower() if kind != "transports" else data["type"])
    data = {**data, "type": reg.name}
    try:
        return reg.config_model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, what, source)) from None


def build(kind: str, data: Any, what: str, **extra: Any) -> Any:
    """Validate ``data`` as a config of ``kind`` (see :func:`validate_plugin_config`) and create the plugin."""
    return create(kind, validate_plugin_config(kind, data, what, **extra))
