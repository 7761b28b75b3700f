"""Settings of every subcommand: a dataclass, YAML presets shipped in the package, typed
``key=value`` overrides — parsed by this one module, with the same error messages everywhere.

A settings dataclass declares its fields with :func:`setting`, which records a help line and
the valid range or choices::

    @dataclass
    class FinetuneConfig:
        base_lr: float = setting(1e-3, "peak lr = base_lr × batch / 256", low=0, low_open=True)

Values arrive as YAML scalars (``1e-3``, ``true``, ``[0.9, 0.95]``) from a file, from
``key=value`` words on the command line, or from ``--flag`` options generated for chosen
fields (:func:`add_arguments`); :func:`build` turns them into the dataclass, coercing each to its
field's type and checking its range, or raises :class:`ConfigError` naming the source, the key,
what is wrong and what would be right.

YAML is read defensively: at most :data:`MAX_YAML_BYTES`, and anchors/aliases are refused (a
405-byte alias bomb would otherwise expand to gigabytes), so a hostile file costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError
from .io import read_text

MAX_YAML_BYTES = 1 * 2**20
PRESET_PACKAGE = "rmae.presets"


class ConfigError(UserError, ValueError):
    """A config file, preset or override is wrong; the message names it and says how to fix it."""


# ---------------------------------------------------------------------------------------------
# declaring settings


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None,
            choices: typing.Sequence[Any] | None = None, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, flag: str | None = None) -> Any:
    """A dataclass field with a help line and a valid range (``low ≤ v ≤ high``; ``*_open`` makes
    that end strict) or a set of ``choices``. ``flag`` names its ``--flag`` when it has one."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "flag": flag}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def unknown_keys_message(source: str, unknown: typing.Iterable[str], valid: typing.Iterable[str]) -> str:
    """``source: unknown key(s) a (did you mean b?); valid keys: …`` — the one wording everywhere."""
    import difflib

    valid = list(valid)
    parts = []
    for k in sorted(map(str, unknown)):
        close = difflib.get_close_matches(k, valid, n=1)
        parts.append(f"{k} (did you mean {close[0]}?)" if close else k)
    return f"{source}: unknown key(s) {', '.join(parts)}; valid keys: {', '.join(valid)}"


# ---------------------------------------------------------------------------------------------
# YAML without surprises


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (the alias-bomb defence)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - yaml's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not accepted in rmae configs; "
                                 "write the value out")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(f"YAML anchors (&{event.anchor}) are not accepted in rmae configs; "
                                 "write the value out")
        return super().compose_node(parent, index)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_file(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a regular file of at most :data:`MAX_YAML_BYTES`."""
    path = Path(path)
    try:
        text = read_text(path, MAX_YAML_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a {what} is a YAML file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot be read as a {what} ({str(e).replace(f'{path}: ', '')})") from None
    try:
        loaded = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)}); fix or replace the file") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply); fix or replace the file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: keys must be names, got {bad[:3]!r}")
    return loaded


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, YAML value). ``steps=100`` → ("steps", 100)."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. steps=100, region_variant=batch)")
    if len(value) > 4096:
        raise ConfigError(f"override {key}=…: the value is {len(value)} characters; settings are short scalars")
    try:
        return key, yaml_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_first_line(e)})") from None
    except RecursionError:
        raise ConfigError(f"override {key}=…: the value is nested too deeply; settings are short scalars") from None


def parse_overrides(words: typing.Iterable[str]) -> dict[str, Any]:
    return dict(parse_override(w) for w in words)


# ---------------------------------------------------------------------------------------------
# presets (shipped inside the package, so a non-editable install has them)


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def resolve_config(path_or_preset: str | Path) -> tuple[str, dict[str, Any]]:
    """A YAML path, or a preset name (``demo`` → the packaged ``demo.yaml``) → (source, values).

    A bare name is a preset even if a folder of that name sits in the working directory."""
    text = str(path_or_preset)
    p = Path(text)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        if text in list_presets():
            res = resources.files(PRESET_PACKAGE) / f"{text}.yaml"
            try:
                return f"preset {text}", _mapping(yaml_load(res.read_text(encoding="utf-8")), f"preset {text}")
            except yaml.YAMLError as e:  # pragma: no cover - presets ship with the package
                raise ConfigError(f"preset {text}: not valid YAML ({_first_line(e)})") from None
        if not p.exists():
            raise ConfigError(f"config {text}: no such preset or file; presets: {', '.join(list_presets())}")
    if not p.exists():
        raise ConfigError(f"config {text}: no such file; give a YAML path or a preset name "
                          f"({', '.join(list_presets())})")
    return str(p), load_yaml_file(p)  # a folder, FIFO or device is refused there, without blocking


def _mapping(loaded: Any, source: str) -> dict[str, Any]:
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------------------------
# typed values


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Bring a YAML value to a field's type (``float``, ``int``, ``bool``, ``str``, ``X | None``,
    ``tuple[...]``, ``list``, ``dict``) or raise :class:`ConfigError` naming the key.

    YAML reads ``1e-3`` as a string and ``5`` where a float is meant; both are accepted. A float
    that is not finite (``nan``, ``inf``) is never a valid setting."""
    if isinstance(hint, str):
        raise TypeError(f"unresolved type hint {hint!r} for {key}")
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    candidates = [a for a in args if a is not type(None)] if is_union else [hint]
    given = value
    for t in candidates:
        value = given
        origin = typing.get_origin(t) or t
        try:
            if origin is Any:
                return value
            if origin is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    return value.lower() in ("true", "yes", "1", "on")
                continue
            if origin is int:
                if isinstance(value, bool):
                    continue
                if isinstance(value, int):
                    return value
                if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                    return int(value)
                if isinstance(value, str) and value.strip().lstrip("-+").isdigit():
                    return int(value)
                continue
            if origin is float:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    continue
                f = float(value)
                if not math.isfinite(f):
                    raise ConfigError(f"{source}: {key}={value!r} is not a finite number")
                return f
            if origin is str:
                if isinstance(value, str):
                    return value
                continue
            if origin in (tuple, list):
                if isinstance(value, str):  # the command-line form: a,b,c (none or empty = nothing)
                    value = [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",")]
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = [value]  # `clicks=4` is the one-element list
                if not isinstance(value, (list, tuple)):
                    continue
                inner = typing.get_args(t)
                if origin is tuple and inner and inner[-1] is not Ellipsis and len(inner) != len(value):
                    continue
                item_hint = inner[0] if inner else Any
                items = [coerce(f"{key}[{i}]", v, item_hint, source) for i, v in enumerate(value)]
                return tuple(items) if origin is tuple else items
            if origin is dict:
                if isinstance(value, dict):
                    return value
                continue
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ConfigError):
                raise
            continue
    shown = repr(given) if len(repr(given)) < 80 else repr(given)[:77] + "..."
    raise ConfigError(f"{source}: {key}={shown} is not a valid {_type_name(hint)}")


def range_problem(key: str, value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` against a field's declared choices / range (see
    :func:`setting`), as ``key=value is …; it must be …``; None when it is fine."""
    if value is None:
        return None
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
    low, high = meta.get("low"), meta.get("high")
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if low is not None and (v < low or (meta.get("low_open") and v == low)):
            rel = ">" if meta.get("low_open") else ">="
            return f"{key}={value!r} is out of range; it must be {rel} {low:g}"
        if high is not None and (v > high or (meta.get("high_open") and v == high)):
            rel = "<" if meta.get("high_open") else "<="
            return f"{key}={value!r} is out of range; it must be {rel} {high:g}"
    return None


def check_range(key: str, value: Any, meta: typing.Mapping[str, Any], source: str) -> None:
    """The field's declared choices / range (see :func:`setting`), or :class:`ConfigError`."""
    problem = range_problem(key, value, meta)
    if problem:
        raise ConfigError(f"{source}: {problem}")


def build(cls: type, values: typing.Mapping[str, Any], source: str = "settings", *,
          defaults: typing.Mapping[str, Any] | None = None) -> Any:
    """``cls(**typed values)``: unknown keys, wrong types and out-of-range values are one
    :class:`ConfigError` each, naming ``source`` and the key. ``defaults`` are applied first."""
    known = fields_of(cls)
    merged = dict(defaults or {})
    merged.update(values)
    unknown = sorted(k for k in merged if k not in known)
    if unknown:
        raise ConfigError(unknown_keys_message(source, unknown, known))
    hints = typing.get_type_hints(cls)
    typed = {}
    for k, v in merged.items():
        typed[k] = coerce(k, v, hints[k], source)
        check_range(k, typed[k], known[k].metadata, source)
    try:
        return cls(**typed)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def replace(obj: Any, values: typing.Mapping[str, Any], source: str = "overrides") -> Any:
    """A copy of a settings dataclass with ``values`` applied (typed and checked like :func:`build`)."""
    current = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    current.update(values)
    return build(type(obj), current, source)


# ---------------------------------------------------------------------------------------------
# command lines


def keys_help(cls: type, width: int = 96, skip: typing.Iterable[str] = ()) -> str:
    """``key  help (default …)`` lines for a subcommand's ``--help`` epilog."""
    skip = set(skip)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, f.metadata.get("help", ""), default))
    w = max((len(r[0]) for r in rows), default=0)
    out = []
    for name, text, default in rows:
        out.append(f"  {name:<{w}}  {text}" + (f" (default {default})" if default not in (None, "") else ""))
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser, cls: type, flags: typing.Iterable[str] = ()) -> None:
    """``--flag`` options for the named fields (``batch_size`` → ``--batch-size``) and the
    positional ``key=value`` overrides. Flags default to None so an unset flag changes nothing;
    every value is typed and checked by :func:`build`, whichever way it came."""
    known = fields_of(cls)
    for name in flags:
        f = known[name]
        opt = f.metadata.get("flag") or "--" + name.replace("_", "-")
        parser.add_argument(opt, dest=f"setting__{name}", default=None, metavar=name.upper(),
                            help=f.metadata.get("help") or None)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any setting as key=value (see the list of keys below)")


def from_args(cls: type, args: argparse.Namespace, source: str, *,
              defaults: typing.Mapping[str, Any] | None = None) -> Any:
    """The settings ``cls`` from parsed ``args``: ``defaults``, then ``key=value`` overrides,
    then ``--flags`` (a flag is the more specific of the two)."""
    values: dict[str, Any] = dict(defaults or {})
    values.update(parse_overrides(getattr(args, "overrides", None) or []))
    for key, raw in vars(args).items():
        if key.startswith("setting__") and raw is not None:
            name = key[len("setting__"):]
            values[name] = parse_override(f"{name}={raw}")[1] if isinstance(raw, str) and raw.strip() else raw
    return build(cls, values, source)
