"""The hooks a kvframe plugin implements.

Every hook has the registry form ``kvframe_register_X(register)``: the plugin calls
``register(name, factory, config_model)`` once for each thing it provides.  ``factory`` is called
with a validated instance of ``config_model`` (a :class:`kvframe.config.PluginConfig` subclass
whose ``type`` field is a ``Literal[name]``) and returns the object.
"""

import pluggy

hookspec = pluggy.HookspecMarker("kvframe")
hookimpl = pluggy.HookimplMarker("kvframe")


@hookspec
def kvframe_register_stores(register):
    """Register store types. ``factory(config) -> kvframe.backend.StoreBackend``."""


@hookspec
def kvframe_register_transports(register):
    """Register network transports used by distributed stores. ``factory(config) -> transport``."""


@hookspec
def kvframe_register_compressors(register):
    """Register gradient compressors. ``factory(config) -> kvframe.protocols.Compressor``."""


@hookspec
def kvframe_register_optimizers(register):
    """Register optimizers. ``factory(config) -> kvframe.protocols.Optimizer``."""


@hookspec(warn_on_impl=DeprecationWarning("kvframe_register_updaters is now kvframe_register_optimizers (the "
                                          "entry-point group was always kvframe.optimizers)"))
def kvframe_register_updaters(register):
    """The old name of :func:`kvframe_register_optimizers`, still collected."""
