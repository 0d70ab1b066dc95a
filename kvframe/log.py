"""kvframe's log level: ``KVFRAME_LOG_LEVEL``, read here and nowhere else.

``KVFRAME_LOG_LEVEL`` is ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR`` (any case). Every role
honours it: a worker (the user's process) when it creates a store, a server, the scheduler and
``kvframe-launch`` when they start. A bad value is refused at once with a message naming the
variable and the accepted values.

* Unset, a user's process keeps Python's defaults (kvframe's loggers print warnings and errors
  through ``logging.lastResort``; a program that configures ``logging`` itself gets kvframe's
  records as usual), and the server and scheduler log INFO to stderr.
* Set, kvframe's loggers (``kvframe``, ``kvframe_dist``, ``kvframe_transports`` and every package
  that asked :func:`get_logger` for one) log at that level to stderr, one line per record
  (``kvframe ROLE: message``; ``kvframe ROLE: debug: message`` for DEBUG), and no longer pass
  records on to the root logger (so a program's own handlers do not print them twice).

Hot paths guard their DEBUG lines with ``log.isEnabledFor(logging.DEBUG)`` (or format lazily with
``%s`` arguments) so that a disabled level costs no formatting.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

ENV = "KVFRAME_LOG_LEVEL"
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}

#: top-level logger names whose level KVFRAME_LOG_LEVEL sets (get_logger adds a plugin's package)
ROOTS: set[str] = {"kvframe", "kvframe_dist", "kvframe_transports"}

_handler: logging.Handler | None = None  # ours, when KVFRAME_LOG_LEVEL is set
_configured: tuple[int, str] | None = None  # (level, role) once configure() applied a level


class LogLevelError(ValueError):
    """KVFRAME_LOG_LEVEL holds something else than a level name."""


def level_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The level ``KVFRAME_LOG_LEVEL`` names, or None when it is unset or empty.

    Raises :class:`LogLevelError` (a ValueError) naming the variable and the accepted values."""
    raw = ((os.environ if environ is None else environ).get(ENV) or "").strip()
    if not raw:
        return None
    level = LEVELS.get(raw.upper())
    if level is None:
        raise LogLevelError(f"{ENV}={raw!r} is not a log level; use one of {', '.join(LEVELS)} (any case), or "
                            "leave it unset")
    return level


def check_env() -> None:
    """Fail fast (LogLevelError) when KVFRAME_LOG_LEVEL is set to something that is no level."""
    level_from_env()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, its top-level package made one of those KVFRAME_LOG_LEVEL sets."""
    root = name.split(".", 1)[0]
    if root not in ROOTS:
        ROOTS.add(root)
        if _configured is not None:
            _apply(logging.getLogger(root), _configured[0])
    return logging.getLogger(name)


def _apply(logger: logging.Logger, level: int) -> None:
    logger.setLevel(level)
    if _handler is not None and _handler not in logger.handlers:
        logger.addHandler(_handler)
        logger.propagate = False


class _Formatter(logging.Formatter):
    """``kvframe ROLE: message`` as without the variable (tools read these lines: the launcher finds
    the scheduler's verdict in them); DEBUG records say so: ``kvframe ROLE: debug: message``."""

    def __init__(self, role: str):
        super().__init__(f"kvframe {role}: %(message)s")
        self.debug_style = logging.PercentStyle(f"kvframe {role}: debug: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        if record.levelno <= logging.DEBUG:
            return self.debug_style.format(record)
        return super().formatMessage(record)


def configure(role: str = "worker", default: int | None = None) -> int | None:
    """Apply ``KVFRAME_LOG_LEVEL`` to kvframe's loggers in this process; returns the level in force.

    ``role`` names the process in each line (``kvframe server: ...``). ``default`` is the level
    when the variable is unset: the server and scheduler pass INFO (their own processes: the root
    logger is configured as ``logging.basicConfig`` would); a user's process passes None and keeps
    its logging untouched. Calling it again changes nothing unless the variable changed.
    Raises :class:`LogLevelError` for a bad value, before anything is configured."""
    global _handler, _configured
    level = level_from_env()
    if level is None:
        if default is None:
            return None
        if not logging.getLogger().handlers:
            logging.basicConfig(level=default, format=f"kvframe {role}: %(message)s", stream=sys.stderr)
        for name in ROOTS:
            logging.getLogger(name).setLevel(default)
        return default
    if _configured == (level, role):
        return level
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_Formatter(role))
    _configured = (level, role)
    for name in sorted(ROOTS):
        _apply(logging.getLogger(name), level)
    return level


__all__ = ["ENV", "LEVELS", "LogLevelError", "check_env", "configure", "get_logger", "level_from_env"]
