"""Helpers for the ml_collections configs under configs/: `key=value` arguments and validation.

`get_config(arg)` in a config file takes a string such as "paper,codebook=65536,bridge=L/8":
bare words are flags, `key=value` pairs are typed overrides. Every config is validated before
anything is built, and a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import types
import typing
from typing import Any, Callable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field's dotted name.

    ConfigError(field, message) is how the code raises it. It can also be built from a finished
    message alone, which is how ml_collections re-raises an error from `get_config(arg)`
    (`type(e)(text)`), so a bad `:arg` reaches the user as this error with its text.
    """

    def __init__(self, field: str, message: str | None = None):
        super().__init__(field if message is None else f"config field {field}: {message}")
        self.field = None if message is None else field
        self.detail = message  # the message without the field

    def under(self, prefix: str) -> "ConfigError":
        """The same error for the field inside block `prefix` ("" = unchanged): sampling's `top_k` -> `sample.top_k`."""
        if not prefix or self.field is None:
            return self
        return ConfigError(f"{prefix}.{self.field}", self.detail)


def load_file(path, name: str | None = None) -> types.ModuleType:
    """The Python file at `path` (a config or sweep file: they live outside the package) as a module."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arg(arg: str | None, *, flags: tuple[str, ...], keys: Mapping[str, Any]) -> tuple[set[str], dict[str, Any]]:
    """Split "flag1,key=value,..." into (flags, {key: value}).

    Values are parsed as Python literals when possible ("16384" -> int, "(1,2)" -> tuple)
    and kept as strings otherwise ("L/4"). Commas inside brackets do not split.
    `keys` maps each accepted key to its default, which also fixes its type.
    """
    found_flags: set[str] = set()
    values: dict[str, Any] = {}
    for item in _split_top_level(arg or ""):
        if "=" not in item:
            if item not in flags:
                raise ConfigError("arg", f"unknown word {item!r}; flags: {sorted(flags)}, keys: {sorted(keys)}")
            found_flags.add(item)
            continue
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in keys:
            raise ConfigError("arg", f"unknown key {key!r}; choose from {sorted(keys)}")
        values[key] = _coerce(key, raw, keys[key])
    return found_flags, values


def config_from_arg(arg: str | None, base: Callable[[set[str]], ml_collections.ConfigDict], *,
                    keys: Mapping[str, tuple[str | Callable[[ml_collections.ConfigDict, Any], None], Any]],
                    flags: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """What every config file's `get_config(arg)` returns: `base(the flags in arg)`, then each `key=value` of `arg`
    set where `keys` says.

    keys: {key: (target, default)}: the target is a dotted field ("quantizer.codebook_size") or a function
    (config, value) for a key that means more than one field (a preset filling a block); functions run first,
    so a plain key always has the last word on its field. The default fixes the value's type (see parse_arg).
    """
    found, values = parse_arg(arg, flags=flags, keys={key: default for key, (_, default) in keys.items()})
    config = base(found)
    for key in sorted(values, key=lambda key: not callable(keys[key][0])):
        target, value = keys[key][0], values[key]
        if callable(target):
            target(config, value)
            continue
        *parents, leaf = target.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _split_top_level(arg: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in arg:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [s.strip() for s in items if s.strip()]


def _coerce(key: str, raw: str, default: Any) -> Any:
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(f"arg {key}", f"expected true/false, got {raw!r}")
    if isinstance(default, str) and not isinstance(value, str):
        return raw
    if isinstance(default, int) and not isinstance(value, int):
        raise ConfigError(f"arg {key}", f"expected an integer, got {raw!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, (list, int)):
        return tuple(value) if isinstance(value, list) else (value,)
    return value


class Spec:
    """A config block resolved once: a frozen dataclass whose `__post_init__` validates every field (the only
    place each is checked, with `require*` below, naming the field as the dataclass calls it).

    `Spec.from_config(block, "sample")` builds one from a ConfigDict block (or a dict), taking the fields the
    dataclass declares, and reports a bad value under its dotted config name (`sample.top_k`). A field whose
    type is itself a Spec is resolved from its sub-block the same way (`quantizer.codebook_size`). Code below
    takes the spec, never the ConfigDict, and checks nothing again.

    A Spec-typed field declared with `inline()` is resolved from this block itself rather than a sub-block:
    the sampling numbers of a `sample` block (`SamplingConfig`) sit beside the block's other fields.

    Fields added after checkpoints were first written are declared with `later(default)`: the value that
    reproduces an older run, so a saved config without them reads as what it computed (`later_fields`).
    """

    @classmethod
    def from_config(cls, block, prefix: str = "", **overrides):
        values = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
        hints = typing.get_type_hints(cls)
        fields = {}
        for field in dataclasses.fields(cls):
            if not field.init or field.name in overrides:
                continue
            if field.metadata.get("inline"):
                fields[field.name] = hints[field.name].from_config(values, prefix)
                continue
            if field.name not in values:
                continue
            value, kind = values[field.name], hints[field.name]
            if isinstance(kind, type) and issubclass(kind, Spec) and isinstance(value, (Mapping,
                                                                                         ml_collections.ConfigDict)):
                value = kind.from_config(value, f"{prefix}.{field.name}" if prefix else field.name)
            fields[field.name] = value
        try:
            return cls(**fields, **overrides)
        except ConfigError as error:
            raise error.under(prefix) from None
        except TypeError as error:  # a required field the block lacks
            raise ConfigError(prefix or cls.__name__, str(error)) from None

    @classmethod
    def later_fields(cls) -> dict[str, Any]:
        """{field: default} of the fields declared with `later(default)` (see the class docstring)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("later")}


def later(default: Any) -> Any:
    """A Spec field added after checkpoints were first written; `default` reproduces the runs that predate it."""
    return dataclasses.field(default=default, metadata={"later": True})


def inline() -> Any:
    """A Spec-typed field of a Spec resolved from the same config block as the Spec itself (see `Spec`)."""
    return dataclasses.field(metadata={"inline": True})


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(field, message) unless `condition`."""
    if not condition:
        raise ConfigError(field, message)


def require_choice(value: Any, field: str, choices) -> None:
    require(value in choices, field, f"{value!r} is not one of {list(choices)}")


def require_number(value: Any, field: str, *, minimum: float = 0.0, strict: bool = True,
                   integer: bool = False) -> None:
    """value must be a finite number > minimum (>= minimum when not strict); int if `integer`."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    kind = "an int" if integer else "a number"
    require(ok, field, f"must be {kind} {'>' if strict else '>='} {minimum}, got {value!r}")


def flat_fields(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{dotted field: value} of a (nested) config or its JSON form; lists become tuples, so a config
    and the JSON saved from it compare equal."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            out.update(flat_fields(value, name + "."))
        else:
            out[name] = _as_tuples(value)
    return out


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _covered(field: str, prefixes) -> bool:
    return any(field == p or field.startswith(p + ".") for p in prefixes)


MISSING = "<absent>"


def config_changes(saved, current, *, ignore=()) -> list[tuple[str, Any, Any]]:
    """[(field, saved value, current value)] for every field that differs, fields under `ignore`
    (dotted names or block prefixes) left out; a field only one side has shows MISSING on the other."""
    old, new = flat_fields(saved), flat_fields(current)
    return [(field, old.get(field, MISSING), new.get(field, MISSING))
            for field in sorted(old.keys() | new.keys())
            if not _covered(field, ignore) and old.get(field, MISSING) != new.get(field, MISSING)]
