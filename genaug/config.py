"""Typed stage configs: dataclasses with help text, loaded from YAML/TOML plus CLI overrides.

Each stage declares a dataclass whose fields carry ``metadata={"help": ...}`` and checks its
invariants in ``__post_init__``. This module turns such a class into argparse flags, reads a
config file, and merges defaults <- file <- flags with strict type checks, so an unknown key or
a wrong type is one clear error instead of a silent default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import ConfigError

C = TypeVar("C")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **extra: Any):
    """A dataclass field with help text (shown by ``--help``) and an optional default factory."""
    metadata = {"help": help, **extra}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(inner))
    elif get_origin(inner) in (list, tuple):
        (item, *_) = get_args(inner) or (str,)
        name = f"a list of {_type_name(item)}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML/TOML or a CLI string) to ``tp``; raise ConfigError if it does not fit."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"null is not allowed, expected {_type_name(tp)}", where=where)
    bad = ConfigError(f"{value!r} is not {_type_name(tp)}", where=where, fix="give a value of that type")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise bad
    if origin in (list, tuple):
        (item_tp, *_) = get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(value, (dict, list, bool)):
            raise bad
        return str(value)
    if inner is Path:
        if not isinstance(value, (str, Path)):
            raise bad
        return Path(value)
    if inner is dict or get_origin(inner) is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict (safe loaders only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", where=str(path), fix="check the path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"cannot parse config ({first})", where=str(path), fix="fix the YAML/TOML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of keys to values", where=str(path))
    return data


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        known = ", ".join(sorted(types_))
        raise ConfigError(
            f"unknown key {unknown[0]!r} for {cls.__name__}",
            where=source,
            fix=f"remove it or use one of: {known}",
        )
    values = {k: coerce(v, types_[k], f"{source}: {k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field left out
        raise ConfigError(str(exc), where=source, fix="set every required key") from None
    except ValueError as exc:  # raised by __post_init__ checks
        raise ConfigError(str(exc), where=source) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return config_to_dict(v)
    return v


def _json_settings(cfg: Any) -> dict[str, Any]:
    """``config_to_dict`` as it reads back from JSON (tuples as lists, ints and floats as written)."""
    return json.loads(json.dumps(config_to_dict(cfg)))


def config_defaults(cls: type) -> dict[str, Any]:
    """Each field's default as ``config_to_dict`` would write it (fields without a default left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps({k: _plain(v) for k, v in out.items()}))


def legacy_settings(cls: type) -> dict[str, Any]:
    """Options whose default changed the behaviour when they were added, with the value that matches
    the behaviour before (a config class's ``LEGACY_SETTINGS``).

    A run recorded before such an option existed behaved as if it had the legacy value, so that is the
    baseline against which its recording and cache key are compared."""
    return json.loads(json.dumps({k: _plain(v) for k, v in getattr(cls, "LEGACY_SETTINGS", {}).items()}))


def explicit_settings(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` that differ from its class's defaults, JSON-normalized.

    What a run asks for, independent of options added to genaug later with defaults that keep the
    old behaviour: cache keys built from it survive such upgrades. An option whose default changed
    the behaviour (``LEGACY_SETTINGS``) counts as explicit unless it has its legacy value, so keys
    written before it existed stop matching, as they should."""
    baseline = {**config_defaults(type(cfg)), **legacy_settings(type(cfg))}
    return {k: v for k, v in _json_settings(cfg).items() if k not in baseline or baseline[k] != v}


def same_settings(recorded: Any, cfg: Any) -> bool:
    """Whether a config recorded on disk (perhaps by an older genaug) asks for what ``cfg`` asks for.

    Equal on every field both know; a field the recording lacks (added to genaug since) must be at its
    default in ``cfg``, or at its legacy value if the option changed the behaviour when it was added;
    a field ``cfg`` does not know (removed since) makes them differ."""
    if not isinstance(recorded, dict):
        return False
    current = _json_settings(cfg)
    if set(recorded) - set(current):
        return False
    baseline = {**config_defaults(type(cfg)), **legacy_settings(type(cfg))}
    return all(recorded[k] == v if k in recorded else (k in baseline and baseline[k] == v)
               for k, v in current.items())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of ``cls`` (values parsed later, strictly)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file with this stage's settings; flags override it")
    group = parser.add_argument_group(f"{cls.__name__} settings")
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        help_text += f" [{_type_name(tp)}; " + ("required" if required else f"default: {default!r}") + "]"
        inner, _ = _unwrap_optional(tp)
        if f.metadata.get("positional"):
            # also accepted as a flag, so config files and recipes name it like any other key
            parser.add_argument(f"{f.name}_positional", nargs="?", metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=help_text.replace("%", "%%"))
        if inner is bool:
            # --flag / --no-flag, so a file's `true` can still be switched off from the CLI
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        elif get_origin(inner) in (list, tuple):
            # Repeating a list flag adds to it (--extra-data a --extra-data b), as commas do (a,b).
            group.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS,
                               action="append", help=help_text.replace("%", "%%") + " (repeat or comma-separate)")
        else:
            group.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS,
                               help=help_text.replace("%", "%%"))


def config_from_args(cls: type[C], args: argparse.Namespace, base: dict[str, Any] | None = None) -> C:
    """Merge defaults <- ``base`` <- ``--config`` file <- explicit flags into ``cls``."""
    data: dict[str, Any] = dict(base or {})
    source = "command line"
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(read_config_file(config_path))
        source = f"{config_path} + command line"
    names = set(_field_types(cls))
    # An appended list flag arrives as one string per use; each may itself be comma-separated.
    given = {k: ",".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
             for k, v in vars(args).items()}
    data.update({k: v for k, v in given.items() if k in names})
    data.update({k[: -len("_positional")]: v for k, v in given.items() if k.endswith("_positional")
                 and k[: -len("_positional")] in names})
    return config_from_dict(cls, data, source=source)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
