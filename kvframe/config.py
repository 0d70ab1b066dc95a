"""Validated configs. Every store, compressor, optimizer and transport has a pydantic model.

A plugin's model subclasses one of the bases below and pins ``type`` to a ``Literal`` of its
registered name.  Validation picks the model by ``type`` from the installed plugins, so a
third-party compressor or optimizer validates exactly like a built-in one, before anything
reaches a backend or the network.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """Base of every plugin config: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)
    type: str


class StoreConfig(PluginConfig):
    """Options of a store type (``kvframe.create(name, **options)``)."""


class CompressionConfig(PluginConfig):
    """Options of a gradient compressor (``set_gradient_compression``)."""


class OptimizerConfig(PluginConfig):
    """Options of an optimizer (``set_optimizer``)."""


class TransportConfig(PluginConfig):
    """Options of a network transport (every transport honours these)."""

    max_message_bytes: int = pydantic.Field(
        1 << 34, ge=1 << 16, description="a message larger than this is refused before any of it is buffered")
    connect_timeout: float = pydantic.Field(
        30.0, gt=0, description="seconds to keep trying to reach a peer that does not answer yet")
    send_timeout: float = pydantic.Field(
        300.0, gt=0, description="seconds a send may make no progress (the peer stopped reading) before it fails")
    max_first_message_bytes: int = pydantic.Field(
        1 << 16, ge=1024, description="the first message on an accepted connection (a handshake, before the peer "
        "is authenticated) larger than this is refused before it is buffered")
    max_queued_bytes: int = pydantic.Field(
        1 << 30, ge=1 << 16, description="received messages waiting for recv() beyond this many bytes make the "
        "transport stop reading until recv() catches up (the senders slow down; memory stays bounded)")


# messages stay short whatever the input: values and names are cut, problems listed up to a count
SHOWN = 160  # characters of a value, name or path shown in a message
MAX_PROBLEMS = 50  # problems listed in one error


def shorten(text: str, limit: int = SHOWN) -> str:
    """``text``, cut in the middle when longer than ``limit`` characters (for messages)."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 10)
    return f"{text[: keep // 2 + keep % 2]}...({len(text)} characters)...{text[-(keep // 2):]}"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def show_value(value: Any) -> str:
    """A repr of ``value`` short enough for a message, whatever its size or nesting."""
    try:
        return shorten(_REPR.repr(value))
    except Exception:  # a repr that fails (an int too long to print): name the type only
        return f"<{type(value).__name__}>"


def error_message(e: Mapping[str, Any]) -> str:
    """pydantic's message for one error, with its jargon about union tags made plain."""
    if e.get("type") == "union_tag_not_found":
        tag = (e.get("ctx") or {}).get("discriminator", "'type'")
        return (f"field {tag} is required here: it names which kind of config this is (`kvframe config-schema` "
                "lists them)")
    return str(e.get("msg"))


def format_validation_error(err: pydantic.ValidationError, what: str, source: str | None = None) -> str:
    """One line per problem: the field path, the reason and the value that came."""
    where = f" in {source}" if source else ""
    lines = [f"invalid {what}{where}:"]
    errors = err.errors(include_url=False)
    for e in errors[:MAX_PROBLEMS]:
        path = shorten(".".join(str(p) for p in e.get("loc", ())) or "(root)")
        got = e.get("input")
        shown = "" if isinstance(got, Mapping) else f" (got {show_value(got)})"
        lines.append(f"  {path}: {shorten(error_message(e), 1000)}{shown}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"  ... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)
