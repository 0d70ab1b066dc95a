"""Exceptions a user can act on. Every message says what was wrong and what was expected."""


class KVFrameError(Exception):
    """Base class of every kvframe error."""


class PluginNotFoundError(KVFrameError, LookupError):
    """No installed plugin provides the asked-for name."""


class PluginImportError(KVFrameError, ImportError):
    """A plugin's module failed to import; names its distribution and the cause."""


class DuplicateRegistrationError(KVFrameError, ValueError):
    """Two plugins registered the same name for the same kind."""


class ConfigError(KVFrameError, ValueError):
    """A compression, optimizer, store or file config failed validation."""


class KeyNotInitializedError(KVFrameError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateInitError(KVFrameError, ValueError):
    pass


class MixedKeyTypesError(KVFrameError, TypeError):
    pass


class ShapeMismatchError(KVFrameError, ValueError):
    pass


class DTypeMismatchError(KVFrameError, TypeError):
    pass


class NotSupportedError(KVFrameError, NotImplementedError):
    """The store type cannot do this (for instance compression on 'local')."""


class KVTimeoutError(KVFrameError, TimeoutError):
    """A wait ran out of time; the message names what was waited for."""


class RemoteError(KVFrameError, RuntimeError):
    """A server, scheduler or peer replied with an error or stopped answering."""


class TransportError(KVFrameError, ConnectionError):
    """A peer cannot be reached, a connection broke, or a message broke a transport's limits; the
    message names the peer's address."""
