"""Typed experiment configs: frozen dataclasses, YAML presets and dotted ``key=value`` overrides.

Every experiment defines a (possibly nested) frozen dataclass with defaults and an ``out: str``
field, and parses its command line with :func:`parse_config`::

  python -m experiments.lm_pretrain preset=cpu out=/tmp/run model.num_layers=2 train.lr=1e-3

Rules:
- ``preset=NAME`` loads ``presets_dir/NAME.yaml`` (a nested mapping) first, wherever it appears;
  the other items are applied after it, left to right.
- Keys are dotted paths into nested dataclasses (``model.num_layers``). A key that names no field
  is an error that names the key and lists the valid ones (in presets too).
- Values are parsed as YAML scalars (``4``, ``1e-3``, ``true``, ``null``, ``[1, 2]``) and checked
  against the field's annotation: ``int``, ``float`` (ints accepted), ``bool``, ``str`` (the raw
  text is kept, so ``out=007`` stays ``"007"``), ``X | None``, ``tuple[...]``, ``list[...]``,
  ``Literal[...]`` and nested dataclasses (optional ones are built from their defaults when a
  sub-key is set).
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = [
  "ConfigError",
  "parse_config",
  "config_from_dict",
  "config_to_dict",
  "flatten_dict",
  "config_help",
  "load_preset",
]

_MISSING = object()


class ConfigError(ValueError):
  """A config key or value that does not fit the config dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_hints(cls: type) -> dict[str, Any]:
  try:
    return typing.get_type_hints(cls)
  except Exception:  # unresolved forward references: fall back to the raw annotations
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
  """Checks ``value`` against annotation ``tp`` and converts it (list -> tuple, int -> float)."""
  if tp is Any or tp is object or isinstance(tp, str):
    return value
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      if type(None) in args:
        return None
      raise ConfigError(f"config key {key!r} may not be null (expected {_type_name(tp)})")
    errors = []
    # Try the non-None members, the more specific ones first (bool before int before float).
    members = [a for a in args if a is not type(None)]
    for member in members:
      try:
        return _coerce(value, member, key, raw)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"config key {key!r}: value {value!r} does not match {_type_name(tp)}")
  if origin is typing.Literal:
    if value in args:
      return value
    raise ConfigError(f"config key {key!r}: value {value!r} is not one of {list(args)}")
  if _is_dataclass_type(tp):
    if isinstance(tp, type) and isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(
        f"config key {key!r} is a section ({tp.__name__}); got {value!r}, expected a mapping"
      )
    return _build(tp, value, prefix=key + ".")
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"config key {key!r}: expected a bool (true/false), got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, str):  # PyYAML reads '1e6' (no dot) as a string: allow it for counts
      try:
        as_float = float(value)
      except ValueError:
        as_float = None
      if as_float is not None and as_float.is_integer() and "e" in value.lower():
        return int(as_float)
    raise ConfigError(f"config key {key!r}: expected an int, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:  # PyYAML reads '1e-3' (no dot) as a string
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"config key {key!r}: expected a float, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    if raw is not None:
      return raw
    if value is None:
      raise ConfigError(f"config key {key!r}: expected a string, got null")
    return str(value)
  if tp in (tuple, list) or origin in (tuple, list, Sequence):
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
    items = list(value)
    if args and not (len(args) == 2 and args[1] is Ellipsis):
      if len(args) != len(items):
        raise ConfigError(
          f"config key {key!r}: expected {len(args)} items ({_type_name(tp)}), got {value!r}"
        )
      items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args, strict=True))]
    elif args:
      items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    else:
      items = [tuple(v) if isinstance(v, list) else v for v in items]
    return list(items) if (tp is list or origin is list) else tuple(items)
  if origin in (dict, Mapping) or tp is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
    return dict(value)
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
  return value


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
  """Builds dataclass ``cls`` from a nested mapping; missing fields take their defaults."""
  hints = _type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = [k for k in values if k not in fields]
  if unknown:
    raise ConfigError(
      f"unknown config key {prefix + unknown[0]!r}; valid keys"
      f"{' under ' + prefix[:-1] if prefix else ''}: {sorted(fields)}"
    )
  kwargs = {}
  for name, field in fields.items():
    tp = hints.get(name, field.type)
    key = prefix + name
    if name in values:
      entry = values[name]
      raw = None
      if isinstance(entry, _Raw):
        entry, raw = entry.value, entry.raw
      if isinstance(entry, Mapping) and not _is_dataclass_type(tp):
        # A sub-mapping into an optional dataclass field (X | None): build X from defaults.
        sub = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        if sub:
          default = _default_of(field)
          base = config_to_dict(default) if dataclasses.is_dataclass(default) else {}
          kwargs[name] = _build(sub[0], _deep_merge(base, entry), prefix=key + ".")
          continue
      if isinstance(entry, Mapping) and _is_dataclass_type(tp):
        default = _default_of(field)
        base = (
          _shallow_fields(default)
          if default is not _MISSING and dataclasses.is_dataclass(default)
          else {}
        )
        kwargs[name] = _build(tp, _deep_merge(base, entry), prefix=key + ".")
        continue
      kwargs[name] = _coerce(entry, tp, key, raw)
    elif _default_of(field) is _MISSING:
      raise ConfigError(f"config key {key!r} is required (type {_type_name(tp)}) and has no default")
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"invalid config section {prefix[:-1] or cls.__name__}: {e}") from e


def _shallow_fields(obj: Any) -> dict[str, Any]:
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _default_of(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return _MISSING


@dataclasses.dataclass(frozen=True)
class _Raw:
  """A command-line value with its original text (for ``str`` fields)."""

  value: Any
  raw: str


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in update.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _deep_merge(out[k], v)
    elif isinstance(v, Mapping) and dataclasses.is_dataclass(out.get(k)):
      out[k] = _deep_merge(_shallow_fields(out[k]), v)
    else:
      out[k] = v
  return out


def _check_keys(cls: type, tree: Mapping[str, Any], prefix: str = "") -> None:
  """Raises ConfigError for the first key of ``tree`` that names no field of ``cls``."""
  hints = _type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  for k, v in tree.items():
    if k not in fields:
      raise ConfigError(
        f"unknown config key {prefix + k!r}; valid keys"
        f"{' under ' + prefix[:-1] if prefix else ''}: {sorted(fields)}"
      )
    tp = hints.get(k, fields[k].type)
    subs = [tp] if _is_dataclass_type(tp) else [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
    if isinstance(v, Mapping) and subs:
      _check_keys(subs[0], v, prefix + k + ".")


def load_preset(presets_dir: str | pathlib.Path, name: str) -> dict[str, Any]:
  """Reads ``presets_dir/name.yaml`` as a nested mapping."""
  path = pathlib.Path(presets_dir) / f"{name}.yaml"
  if not path.is_file():
    available = sorted(p.stem for p in pathlib.Path(presets_dir).glob("*.yaml"))
    raise ConfigError(f"unknown preset {name!r}: no file {path}; available presets: {available}")
  with open(path) as f:
    tree = yaml.safe_load(f) or {}
  if not isinstance(tree, Mapping):
    raise ConfigError(f"preset {path} must hold a mapping, got {type(tree).__name__}")
  return dict(tree)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
  parts = key.split(".")
  node = tree
  for p in parts[:-1]:
    nxt = node.get(p)
    if not isinstance(nxt, dict):
      nxt = {} if not isinstance(nxt, Mapping) else dict(nxt)
      node[p] = nxt
    node = nxt
  node[parts[-1]] = value


def parse_config(
  config_cls: type,
  argv: Sequence[str],
  *,
  presets_dir: str | pathlib.Path | None = None,
) -> Any:
  """Parses ``argv`` (``key=value`` items, optional ``preset=NAME``) into ``config_cls``.

  Args:
    config_cls: a frozen dataclass type whose fields all have defaults (nested allowed).
    argv: command-line items such as ``["preset=cpu", "out=/tmp/x", "model.num_layers=2"]``.
    presets_dir: folder of ``NAME.yaml`` presets; required when ``preset=`` is given.

  Returns:
    An instance of ``config_cls``.

  Raises:
    ConfigError: malformed item, unknown key (named, with the valid keys listed), a value of the
      wrong type, or an unknown preset.
  """
  tree: dict[str, Any] = {}
  overrides: list[tuple[str, Any]] = []
  preset_names = []
  for item in argv:
    if item in ("-h", "--help", "help"):
      raise SystemExit(config_help(config_cls, presets_dir=presets_dir))
    if "=" not in item:
      raise ConfigError(f"expected key=value, got {item!r} (e.g. out=/tmp/run model.num_layers=2)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
      raise ConfigError(f"empty key in {item!r}")
    if key == "preset":
      preset_names.append(raw)
      continue
    try:
      value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
      value = raw
    overrides.append((key, _Raw(value, raw)))
  for name in preset_names:
    if presets_dir is None:
      raise ConfigError(f"preset={name} given but this experiment has no presets folder")
    preset = load_preset(presets_dir, name)
    _check_keys(config_cls, preset)
    tree = _deep_merge(tree, preset)
  for key, value in overrides:
    _check_dotted_key(config_cls, key)
    _set_dotted(tree, key, value)
  return _build(config_cls, tree)


def _check_dotted_key(cls: type, key: str) -> None:
  node: Any = cls
  parts = key.split(".")
  for i, p in enumerate(parts):
    prefix = ".".join(parts[:i])
    if not _is_dataclass_type(node):
      raise ConfigError(f"unknown config key {key!r}: {prefix!r} is not a section")
    fields = {f.name: f for f in dataclasses.fields(node) if f.init}
    if p not in fields:
      raise ConfigError(
        f"unknown config key {key!r}; valid keys"
        f"{' under ' + prefix if prefix else ''}: {sorted(fields)}"
      )
    tp = _type_hints(node).get(p, fields[p].type)
    if i < len(parts) - 1:
      subs = [tp] if _is_dataclass_type(tp) else [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
      node = subs[0] if subs else tp


def config_from_dict(config_cls: type, tree: Mapping[str, Any]) -> Any:
  """Builds ``config_cls`` from a nested mapping (the inverse of :func:`config_to_dict`)."""
  _check_keys(config_cls, tree)
  return _build(config_cls, tree)


def _to_plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    if hasattr(value, "to_dict") and callable(value.to_dict):
      return _to_plain(value.to_dict())
    return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): _to_plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_to_plain(v) for v in value]
  if isinstance(value, pathlib.PurePath):
    return str(value)
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return value.item()
  return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """A JSON-ready nested dict of a config dataclass (tuples become lists)."""
  out = _to_plain(cfg)
  if not isinstance(out, dict):
    raise TypeError(f"config_to_dict expects a dataclass or mapping, got {type(cfg).__name__}")
  return out


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten_dict(v, key + "."))
    else:
      out[key] = v
  return out


def config_help(config_cls: type, *, presets_dir: str | pathlib.Path | None = None) -> str:
  """A usage text listing every dotted key with its type and default."""
  lines = [f"usage: key=value ... ({config_cls.__name__})"]
  if presets_dir is not None and pathlib.Path(presets_dir).is_dir():
    names = sorted(p.stem for p in pathlib.Path(presets_dir).glob("*.yaml"))
    lines.append(f"presets (preset=NAME): {', '.join(names)}")

  def walk(cls: type, prefix: str) -> None:
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
      tp = hints.get(f.name, f.type)
      default = _default_of(f)
      if _is_dataclass_type(tp):
        walk(tp, prefix + f.name + ".")
      else:
        shown = "<required>" if default is _MISSING else repr(_to_plain(default))
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {shown}")

  walk(config_cls, "")
  return "\n".join(lines)
