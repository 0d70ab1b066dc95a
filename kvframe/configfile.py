"""A whole kvframe setup from one TOML or YAML file, with environment overrides.

The file has up to four sections::

    [store]                 # the store type and that store's own options (default: type = "local")
    type = "dist_sync"
    [compression]           # optional: a gradient compressor config (set_gradient_compression)
    type = "2bit"
    threshold = 0.5
    [optimizer]             # optional: an optimizer config (set_optimizer), lr_scheduler nested
    type = "sgd"
    learning_rate = 0.1
    momentum = 0.9
    [app]                   # optional: free-form settings of the application, not read by kvframe

A section may also be just a name (``store = "local"``).  Setting a compression or optimizer
``type`` to ``"none"`` removes that section (handy from the environment).

**Environment overrides.**  ``KVFRAME_<SECTION>__<FIELD>[__<SUBFIELD>...]`` sets one value,
overriding the file: a double underscore separates the levels, names are lowercased, and the
value is parsed as JSON where it can be (``0.05``, ``true``, ``[1, 2]``, ``{"step": 10}``) and
taken as a string otherwise.  For instance ``KVFRAME_STORE__TYPE=dist_sync``,
``KVFRAME_OPTIMIZER__LEARNING_RATE=0.05``, ``KVFRAME_OPTIMIZER__LR_SCHEDULER__STEP=100``.
Variables without a double underscore (``KVFRAME_CONFIG``, ``KVFRAME_TIMEOUT``...) are not
overrides.  ``KVFRAME_CONFIG`` names the file to read when none is given.

**Bounded.**  Whatever a file or variable holds, reading it stays small in time and memory: a
file is at most :data:`MAX_FILE_BYTES`, values nest at most :data:`MAX_DEPTH` levels, and a config
holds at most :data:`MAX_NODES` values and :data:`MAX_TEXT` characters of text, a YAML alias
counted at every use (so an alias bomb is refused, not expanded).  Values shown in messages are
shortened.

**Validation first.**  Every section is validated by the installed plugin's pydantic model
before anything is created; all problems are reported at once, each with the file, the field
path and the reason (and the environment variable, when the value came from one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from kvframe import plugins
from kvframe.config import (
    MAX_PROBLEMS,
    CompressionConfig,
    OptimizerConfig,
    PluginConfig,
    StoreConfig,
    error_message,
    shorten,
    show_value,
)
from kvframe.errors import ConfigError, KVFrameError

ENV_PREFIX = "KVFRAME_"
ENV_CONFIG = "KVFRAME_CONFIG"

# section -> (registry kind, what it is called in messages, is the type required)
SECTIONS: dict[str, tuple[str, str, bool]] = {
    "store": ("stores", "store", False),
    "compression": ("compressors", "compressor", True),
    "optimizer": ("optimizers", "optimizer", True),
}
DEFAULT_STORE = "local"

# Limits that keep reading any input bounded in time and memory (a kvframe config is a few settings)
MAX_FILE_BYTES = 1 << 20  # bytes of a config file
MAX_DEPTH = 32  # nesting levels of tables and lists (the top level is level 1)
MAX_NODES = 100_000  # values in a config, a YAML alias counted at every use
MAX_TEXT = 2 << 20  # characters of strings and names in a config, a YAML alias counted at every use


def _where(path: tuple) -> str:
    """A field path for messages: ``optimizer.lr_scheduler.step``, shortened when long or deep."""
    parts = [shorten(str(p), 40) for p in path]
    if len(parts) > 8:
        parts = parts[:5] + [f"...({len(parts)} levels)..."] + parts[-2:]
    return ".".join(parts) or "(top level)"


def check_limits(data: Any, what: str, prefix: tuple = ()) -> None:
    """Refuse ``data`` nested more than :data:`MAX_DEPTH` levels (or containing itself), or holding
    more than :data:`MAX_NODES` values or :data:`MAX_TEXT` characters, a value used in several
    places counted at every use: so what is accepted stays small for everything that reads it
    (validation, messages, ``kvframe validate --json``).  ``what`` names the source in the error
    ("config file x.yaml"), ``prefix`` is the field path of ``data`` in the config."""
    nodes = 0
    text = 0
    stack: list[tuple[Any, tuple]] = [(data, tuple(prefix))]
    while stack:
        node, path = stack.pop()
        if isinstance(node, (str, bytes, bytearray)):
            text += len(node)
        elif isinstance(node, (Mapping, list, tuple, set, frozenset)):
            if len(path) >= MAX_DEPTH:
                raise ConfigError(f"{what}: {_where(path)}: values are nested more than {MAX_DEPTH} levels deep "
                                  "(or a value contains itself); a kvframe config is a few levels of settings")
            nodes += len(node)
            if nodes > MAX_NODES:
                raise ConfigError(f"{what}: {_where(path)}: the config holds more than {MAX_NODES} values (shared "
                                  "values and YAML aliases counted at every use); a kvframe config holds settings: "
                                  "keep data in files of its own")
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            for k, v in items:
                if isinstance(k, str):
                    text += len(k)
                stack.append((v, path + (k,)))
        if text > MAX_TEXT:
            raise ConfigError(f"{what}: {_where(path)}: the config holds more than {MAX_TEXT} characters of text "
                              "(shared values and YAML aliases counted at every use); a kvframe config holds "
                              "settings: keep data in files of its own")


class FileSections(BaseModel):
    """The shape of a config file before the plugins check their own sections."""

    model_config = ConfigDict(extra="forbid")

    store: Union[dict[str, Any], str] = Field(default_factory=lambda: {"type": DEFAULT_STORE},
                                              description="the store type and its options")
    compression: Union[dict[str, Any], str, None] = Field(None, description="gradient compression config")
    optimizer: Union[dict[str, Any], str, None] = Field(None, description="optimizer config (with lr_scheduler)")
    app: dict[str, Any] = Field(default_factory=dict, description="free-form settings of the application")


@dataclass
class KVFrameConfig:
    """A validated config file: the plugin config models of each section, ready to apply."""

    store: StoreConfig
    store_name: str  # the name as written (an MXNet alias such as 'dist' is kept for KVStore.type)
    compression: CompressionConfig | None = None
    optimizer: OptimizerConfig | None = None
    app: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    overrides: dict[str, str] = field(default_factory=dict)  # env variable -> the raw value used

    def summary(self) -> str:
        """A few human lines: what this config sets up."""
        def opts(cfg: PluginConfig) -> str:
            d = cfg.model_dump(exclude={"type"}, exclude_unset=True, mode="json")
            return ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "defaults"

        lines = [f"store:       {self.store.type}" + (f" (as {self.store_name!r})" if self.store_name != self.store.type
                                                      else "") + f" [{opts(self.store)}]"]
        lines.append("compression: " + (f"{self.compression.type} [{opts(self.compression)}]" if self.compression
                                        else "none"))
        lines.append("optimizer:   " + (f"{self.optimizer.type} [{opts(self.optimizer)}]" if self.optimizer
                                        else "none (the store assigns the summed pushes)"))
        if self.app:
            names = sorted(map(str, self.app))
            lines.append("app:         " + ", ".join(shorten(n, 40) for n in names[:20])
                         + (f", ... ({len(names)} in all)" if len(names) > 20 else ""))
        if self.overrides:
            lines.append("overrides:   " + ", ".join(f"{shorten(k)}={shorten(v)}"
                                                      for k, v in sorted(self.overrides.items())))
        return "\n".join(lines)


# reading --------------------------------------------------------------------------------------

def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:  # pragma: no cover - tomli is a dependency on 3.10
        raise ConfigError("reading TOML on Python 3.10 needs the 'tomli' package: pip install tomli") from None
    return tomli


def _os_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or shorten(str(exc)) or type(exc).__name__


def _deep_spot(text: str) -> str:
    """Where brackets first nest deeper than MAX_DEPTH, as ' at line N (key K)' (a rough scan that
    ignores quoting: it only places the message)."""
    depth, key = 0, ""
    for n, line in enumerate(text.splitlines(), 1):
        if depth == 0 and "=" in line:
            key = line.split("=", 1)[0].strip()
        for ch in line:
            if ch in "[{":
                depth += 1
            elif ch in "]}" and depth:
                depth -= 1
            if depth > MAX_DEPTH:
                return f" at line {n}" + (f" (key {shorten(key, 60)!r})" if key else "")
    return ""


@functools.cache
def _bounded_yaml_loader() -> Any:
    """PyYAML's safe loader, bounded while it composes the document: nesting beyond MAX_DEPTH and
    documents beyond MAX_NODES values or MAX_TEXT characters (an alias counted at every use, with
    the size of what it names) are refused before anything is built, with the line and the field."""
    import yaml
    from yaml.composer import Composer

    base: Any = yaml.SafeLoader
    try:
        from yaml.cyaml import CParser
    except ImportError:  # PyYAML built without libyaml: all in Python
        pass
    else:
        class CParsed(CParser, Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):  # type: ignore
            """libyaml parses (4x faster); the nodes are composed in Python, where they are counted."""

            get_single_node = Composer.get_single_node
            check_node = Composer.check_node
            get_node = Composer.get_node

            def __init__(self, stream: Any) -> None:
                CParser.__init__(self, stream)
                Composer.__init__(self)
                yaml.constructor.SafeConstructor.__init__(self)
                yaml.resolver.Resolver.__init__(self)

        base = CParsed

    class Loader(base):  # type: ignore[valid-type,misc]
        source = "<yaml>"

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self.kv_path: list = []
            self.kv_nodes = 0
            self.kv_text = 0
            self.kv_sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) it expands to

        def _kv_fail(self, reason: str, mark: Any) -> None:
            # the path of indexes: list positions, and key nodes (a scalar key's text; '?' for a complex key)
            path = tuple(i if isinstance(i, int) else i.value if isinstance(i, yaml.ScalarNode) else "?"
                         for i in self.kv_path[1:])
            raise ConfigError(f"invalid config in {self.source}, line {mark.line + 1}, column {mark.column + 1}: "
                              f"{_where(path)}: {reason}")

        def _kv_count(self, nodes: int, text: int, mark: Any) -> None:
            self.kv_nodes += nodes
            self.kv_text += text
            if self.kv_nodes > MAX_NODES:
                self._kv_fail(f"the config holds more than {MAX_NODES} values (YAML aliases counted at every use); "
                              "a kvframe config holds settings: keep data in files of its own", mark)
            if self.kv_text > MAX_TEXT:
                self._kv_fail(f"the config holds more than {MAX_TEXT} characters of text (YAML aliases counted at "
                              "every use); a kvframe config holds settings: keep data in files of its own", mark)

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None:  # (an undefined alias is the composer's own error)
                    self._kv_count(*self.kv_sizes.get(id(target), (1, 0)), event.start_mark)
                return super().compose_node(parent, index)
            self.kv_path.append(index)
            if not isinstance(event, yaml.ScalarEvent) and len(self.kv_path) > MAX_DEPTH:
                self._kv_fail(f"values are nested more than {MAX_DEPTH} levels deep; a kvframe config is a few "
                              "levels of settings", event.start_mark)
            start = (self.kv_nodes, self.kv_text)
            self._kv_count(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, event.start_mark)
            node = super().compose_node(parent, index)
            self.kv_path.pop()
            if getattr(event, "anchor", None) is not None:
                self.kv_sizes[id(node)] = (self.kv_nodes - start[0], self.kv_text - start[1])
            return node

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, TypeError, OverflowError) as exc:  # a date like 2020-13-45, a 5000-digit int
                raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {shorten(str(exc))}",
                                                        node.start_mark) from None

    return Loader


def _load_yaml(text: str, shown: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"reading {shown} needs PyYAML: pip install pyyaml (or use a .toml file)") from None
    loader = _bounded_yaml_loader()(text)
    loader.source = shown
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {shown}: {shorten(str(exc), 2000)}") from None
    except RecursionError:  # kept from happening by the depth limit; never a traceback all the same
        raise ConfigError(f"invalid config in {shown}: values are nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a TOML (.toml) or YAML (.yaml, .yml) file, as a dict, checked against
    the limits (:func:`check_limits`).  Every failure is a :class:`ConfigError` naming the file."""
    p = Path(path)
    shown = shorten(str(p))
    try:
        missing = not p.is_file() and ("not a file" if p.exists() else "not found")
        if not missing:
            with open(p, "rb") as f:  # read no more than the limit, whatever the file claims
                raw = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # a name too long, a directory that may not be searched, a NUL
        raise ConfigError(f"cannot read config file {shown!r}: {_os_reason(exc)}") from None
    if missing:
        raise ConfigError(f"config file {shown!r} not found" if missing == "not found" else
                          f"config path {shown!r} is not a file")
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"config file {shown} is larger than {MAX_FILE_BYTES} bytes; a kvframe config holds "
                          "settings: keep data in files of its own")
    suffix = p.suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {shown} is not UTF-8 text: {exc}") from None
    if suffix == ".toml":
        toml = _toml_module()
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {shown}: {shorten(str(exc), 2000)}") from None
        except RecursionError:  # the TOML parser recurses into nested arrays and inline tables
            raise ConfigError(f"invalid config in {shown}{_deep_spot(text)}: values are nested more than "
                              f"{MAX_DEPTH} levels deep; a kvframe config is a few levels of settings") from None
    elif suffix in (".yaml", ".yml"):
        data = _load_yaml(text, shown)
        if data is None:
            data = {}
    else:
        raise ConfigError(f"config file {shown}: unknown extension {shorten(suffix, 40) or '(none)'!r}; use .toml, "
                          ".yaml or .yml")
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid config in {shown}: the top level must be a table/mapping of sections "
                          f"(store, compression, optimizer, app); got {type(data).__name__}")
    check_limits(data, f"config file {shown}")
    return dict(data)


def parse_env_value(raw: str) -> Any:
    """JSON where it parses (numbers, true/false/null, lists, objects, quoted strings), else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw
    except RecursionError:  # json recurses into nested lists and objects
        raise ConfigError(f"the value is nested more than {MAX_DEPTH} levels deep") from None


def env_overrides(environ: Mapping[str, str] | None = None) -> list[tuple[str, tuple[str, ...], Any, str]]:
    """The ``KVFRAME_A__B__C`` variables as (variable, path, parsed value, raw value), sorted by name."""
    environ = os.environ if environ is None else environ
    found = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue
        shown = shorten(name)
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        if any(not p for p in parts):
            raise ConfigError(f"environment variable {shown}: empty name between '__' separators; "
                              f"use KVFRAME_SECTION__FIELD[__SUBFIELD]")
        if len(parts) >= MAX_DEPTH:
            raise ConfigError(f"environment variable {shown}: {len(parts)} levels of names; a kvframe config is "
                              f"nested at most {MAX_DEPTH} levels deep")
        try:
            value = parse_env_value(environ[name])
        except ConfigError as exc:
            raise ConfigError(f"environment variable {shown}: {exc}") from None
        check_limits(value, f"environment variable {shown}", parts)
        found.append((name, parts, value, environ[name]))
    return found


def _apply_override(data: dict, path: tuple[str, ...], value: Any, var: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if isinstance(child, str) and i == 0 and part in SECTIONS:  # "store = 'local'" shorthand
            child = {"type": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"environment variable {shorten(var)}: cannot set {_where(path)} because "
                              f"{shorten(where)} is {type(child).__name__} {show_value(child)}, not a table")
        child = dict(child)
        node[part] = child
        node = child
    node[path[-1]] = value


# validation -----------------------------------------------------------------------------------

def _fmt_value(v: Any) -> str:
    return "" if isinstance(v, Mapping) else f" (got {show_value(v)})"


class _Problems:
    def __init__(self, source: str, env_paths: dict[tuple[str, ...], str]):
        self.source = source
        self.env_paths = env_paths
        self.lines: list[str] = []
        self._seen: set[str] = set()
        self.more = 0  # problems beyond MAX_PROBLEMS, counted only

    def full(self) -> bool:
        return len(self.lines) >= MAX_PROBLEMS

    def add(self, path: tuple, reason: str) -> None:
        if self.full():
            self.more += 1
            return
        spath = tuple(str(p) for p in path)
        var = next((v for p, v in self.env_paths.items() if spath[: len(p)] == p or p[: len(spath)] == spath), None)
        line = f"  {_where(spath)}: {shorten(reason, 1000)}" + (f" [from environment variable {shorten(var)}]"
                                                                 if var else "")
        if line not in self._seen:
            self._seen.add(line)
            self.lines.append(line)

    def raise_if_any(self) -> None:
        if self.lines:
            more = [f"  ... and {self.more} more problems"] if self.more else []
            raise ConfigError(f"invalid kvframe config in {shorten(self.source)}:\n" + "\n".join(self.lines + more))


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """The error location as the user wrote it: pydantic adds union tags (a nested config's 'type'
    value, or validator names) that are not keys of the input, so follow the input and drop them."""
    out: list = []
    node = data
    for part in loc:
        if isinstance(node, Mapping):
            if part in node:
                out.append(part)
                node = node[part]
                continue
            if isinstance(part, str) and (node.get("type") == part or "[" in part):
                continue  # a tag of a discriminated union, or a validator's name
            out.append(part)
            node = None
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            out.append(part)
            node = None
    return tuple(out)


def _validate_section(section: str, raw: Any, problems: _Problems) -> tuple[PluginConfig | None, str | None]:
    kind, what, type_required = SECTIONS[section]
    if raw is None:
        return None, None
    data = {"type": raw} if isinstance(raw, str) else dict(raw)
    if "type" not in data:
        if type_required:
            problems.add((section, "type"), f"field required: the {what} name, one of {plugins.names(kind)}")
            return None, None
        data["type"] = DEFAULT_STORE
    name = data["type"]
    if not isinstance(name, str):
        problems.add((section, "type"), f"must be a string naming a {what}, one of {plugins.names(kind)}"
                     f"{_fmt_value(name)}")
        return None, None
    if section != "store" and name.lower() == "none":
        return None, None
    written = name
    name = name.lower()
    if section == "store":
        name = plugins.store_name(name)
    try:
        reg = plugins.lookup(kind, name)
    except KVFrameError as exc:  # not installed, disabled, or failed to import
        problems.add((section, "type"), str(exc))
        return None, None
    data["type"] = reg.name
    try:
        return reg.config_model.model_validate(data), written
    except pydantic.ValidationError as err:
        for e in err.errors(include_url=False):
            if problems.full():  # counted, not formatted
                problems.more += 1
                continue
            problems.add((section, *_clean_loc(tuple(e.get("loc", ())), data)),
                         f"{error_message(e)}{_fmt_value(e.get('input'))}")
        return None, None


def _store_type(raw: Any) -> str | None:
    """The registered store name a (possibly invalid) store section asks for, if it is installed."""
    name = raw if isinstance(raw, str) else raw.get("type", DEFAULT_STORE) if isinstance(raw, Mapping) else None
    if not isinstance(name, str):
        return None
    name = plugins.store_name(name)
    try:
        return plugins.lookup("stores", name).name
    except KVFrameError:
        return None


def _compression_supported(store_type: str) -> bool | None:
    """Whether the store type says it can compress gradients (None: it does not say)."""
    caps = getattr(plugins.lookup("stores", store_type).factory, "capabilities", None)
    if not isinstance(caps, (set, frozenset)):
        return None
    return "compression" in caps


def load_config(config: str | os.PathLike | Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> KVFrameConfig:
    """Read and validate a config (a path, a dict, or ``None`` for ``$KVFRAME_CONFIG``), with the
    environment overrides applied. Nothing is created. Raises :class:`kvframe.errors.ConfigError`."""
    environ = os.environ if environ is None else environ
    if config is None:
        path = environ.get(ENV_CONFIG)
        config = path if path else {}
        source = path if path else "<defaults and environment>"
    elif isinstance(config, Mapping):
        source = "<dict>"
    elif isinstance(config, (str, os.PathLike)):
        source = str(config)
    else:
        raise ConfigError(f"a config must be a file path, a dict or None (for ${ENV_CONFIG}); "
                          f"got {type(config).__name__}")
    if isinstance(config, Mapping):
        check_limits(config, f"config {source}")
        data = dict(config)
    else:
        data = read_file(config)

    overrides = env_overrides(environ)
    env_paths: dict[tuple[str, ...], str] = {}
    used: dict[str, str] = {}
    for var, field_path, value, raw in overrides:
        _apply_override(data, field_path, value, var)
        env_paths[field_path] = var
        used[var] = raw
    if overrides:  # the file's values and the variables' together
        check_limits(data, f"config {shorten(source)} with the KVFRAME_... environment overrides")

    problems = _Problems(source, env_paths)
    try:
        sections = FileSections.model_validate(data)
    except pydantic.ValidationError as err:
        bad: set[str] = set()
        for e in err.errors():
            loc = e.get("loc", ())
            bad.add(str(loc[0]) if loc else "")
            if e.get("type") == "extra_forbidden":
                reason = f"unknown section; the sections are {', '.join([*SECTIONS, 'app'])}"
            elif loc and loc[0] in SECTIONS:
                reason = f"must be a table of options with a 'type', or a name{_fmt_value(e.get('input'))}"
                loc = loc[:1]
            else:
                reason = f"{e.get('msg')}{_fmt_value(e.get('input'))}"
            problems.add(loc, reason)
        # the well-formed sections are still checked, so every problem is reported at once
        sections = FileSections.model_validate({k: v for k, v in data.items()
                                                if k in FileSections.model_fields and k not in bad})

    store, store_name = _validate_section("store", sections.store, problems)
    compression, _ = _validate_section("compression", sections.compression, problems)
    optimizer, _ = _validate_section("optimizer", sections.optimizer, problems)
    store_type = store.type if store is not None else _store_type(sections.store)
    if store_type is not None and compression is not None and _compression_supported(store_type) is False:
        problems.add(("compression",), f"store {store_type!r} does not support gradient compression "
                     "(as in MXNet, use store 'device' or a dist store)")
    problems.raise_if_any()
    assert store is not None and store_name is not None
    return KVFrameConfig(store=store, store_name=store_name, compression=compression, optimizer=optimizer,  # type: ignore[arg-type]
                         app=dict(sections.app), source=source, overrides=used)


def _tagged(reg: Any) -> type[BaseModel]:
    """The plugin's config model with ``type`` pinned to its registered name (needed for the union)."""
    model = reg.config_model
    ann = model.model_fields["type"].annotation
    if get_origin(ann) is Literal and get_args(ann) == (reg.name,):
        return model
    pinned: Any = Literal[reg.name]  # a type made at run time, which the type checker cannot follow
    return pydantic.create_model(model.__name__, __base__=model, type=(pinned, reg.name))


def _union(kind: str, skipped: list[str]) -> Any:
    models = []
    for reg in plugins.registrations(kind):
        try:
            m = _tagged(reg)
            m.model_json_schema()
        except Exception as exc:  # a model without a JSON schema is left out, and said so
            skipped.append(f"{kind[:-1]} {reg.name!r} ({reg.distribution or reg.plugin}): {type(exc).__name__}: {exc}")
            continue
        models.append(m)
    if not models:
        return None
    if len(models) == 1:
        return models[0]
    from typing import Annotated

    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


def build_schema_model(skipped: list[str] | None = None) -> type[BaseModel]:
    """The config file's model with discriminated unions of every installed plugin's config model
    (importing every plugin). Models that cannot be expressed in JSON Schema go to ``skipped``."""
    plugins.load_all()
    skipped = [] if skipped is None else skipped
    fields: dict[str, Any] = {}
    for section, (kind, what, _) in SECTIONS.items():
        union = _union(kind, skipped)
        desc = f"the {what} config; installed: {', '.join(plugins.names(kind)) or 'none'}"
        if union is None:
            fields[section] = (Union[dict[str, Any], None], Field(None, description=desc + " (no plugin installed)"))
        elif section == "store":
            fields[section] = (union, Field(default_factory=lambda: {"type": DEFAULT_STORE}, description=desc))
        else:
            fields[section] = (Union[union, None], Field(None, description=desc))
    fields["app"] = (dict[str, Any], Field(default_factory=dict, description="free-form settings of the application"))
    return pydantic.create_model("KVFrameConfigFile", __config__=ConfigDict(extra="forbid"), **fields)


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file for the installed plugins."""
    skipped: list[str] = []
    schema = build_schema_model(skipped).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = ("kvframe config file (TOML or YAML). Environment overrides: "
                             "KVFRAME_<SECTION>__<FIELD>[__<SUBFIELD>], values parsed as JSON where possible.")
    if skipped:
        schema["x-kvframe-skipped"] = skipped
    return schema


__all__ = ["KVFrameConfig", "load_config", "json_schema", "read_file", "env_overrides",
           "parse_env_value", "build_schema_model", "StoreConfig", "CompressionConfig", "OptimizerConfig"]
