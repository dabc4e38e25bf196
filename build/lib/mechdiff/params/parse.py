"""Reading a params mapping into the typed sections of :mod:`mechdiff.params.config`.

:func:`parse_value` walks a parsed YAML value against a type hint (scalars, ``Literal``, unions, lists,
mappings, section dataclasses): an unknown key, a missing key or a value of the wrong type raises
:class:`ParamsError` naming the dotted key and what was expected; every built section is then checked
against its constraints (:func:`mechdiff.params.rules.validate`). :func:`read_yaml` parses YAML text safely,
refusing repeated keys. No ``eval``/``exec``; nothing global.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

from mechdiff.params.rules import ParamsError, validate


def _require(ok: Any, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ParamsError(f"params key '{key}': expected {expected}, got {got!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def parse_value(value: Any, tp: Any, key: str) -> Any:
    """Check the parsed YAML ``value`` at dotted ``key`` against type ``tp`` (recursively) and return it,
    mappings built into their section dataclasses (and validated); floats come back as ``float``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(classes) == 1:  # a mapping: that section's own, precise error
            return build_section(classes[0], value, key)
        for arg in typing.get_args(tp):
            try:
                return parse_value(value, arg, key)
            except ParamsError:
                continue
        raise ParamsError(f"params key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        _require(value in typing.get_args(tp), key, _type_name(tp), value)
        return value
    if origin is list:
        _require(isinstance(value, list), key, _type_name(tp), value)
        return [parse_value(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), key, _type_name(tp), value)
        return {str(k): parse_value(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is type(None):
        _require(value is None, key, "null", value)
        return None
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
                 "a finite number", value)
        return float(value)
    if tp is int or tp is str or tp is bool:
        _require(isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), key, _type_name(tp), value)
        if tp is int:
            _check_int(value, key)
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


# integer keys that count something and must be at least 1 (by the last part of the key), checked as read
COUNT_KEYS = frozenset({"batch_size", "hidden_size", "intermediate_size", "vocab_size", "max_len", "n_layers",
                        "n_heads", "n_kv_heads", "threads", "cv_folds", "max_rows", "shard_prompts",
                        "max_prompt_tokens"})


def _check_int(value: int, key: str) -> None:
    """Every integer is >= 0 and fits 64 bits; seeds fit numpy's 32 bits; sizes and counts are >= 1."""
    name = key.rsplit(".", 1)[-1].split("[")[0]
    if name == "seed" or name.endswith("_seed"):
        _require(0 <= value < 2**32, key, "a seed in [0, 2**32 - 1]", value)
    _require(0 <= value < 2**63, key, "a non-negative integer below 2**63", value)
    if name in COUNT_KEYS:
        _require(value >= 1, key, "an integer >= 1", value)


def build_section(cls: type, data: Any, key: str) -> Any:
    """The section dataclass ``cls`` built from the mapping ``data`` at dotted ``key`` (``""``: the whole
    file), each value read by :func:`parse_value`, missing keys at their defaults, then validated."""
    _require(isinstance(data, dict), key or "<top level>", _type_name(cls), data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for k in data:
        if k not in fields:
            close = [n for n in fields if _similar(str(k), n)]
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"params key '{prefix}{k}': unknown key{hint}; allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = parse_value(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params key '{prefix}{name}': missing; expected {_type_name(hints[name])}")
    obj = cls(**kwargs)
    validate(obj, key)
    return obj


def _similar(a: str, b: str) -> bool:
    """True when ``a`` looks like a misspelling of ``b`` (edit distance <= 2)."""
    if abs(len(a) - len(b)) > 2:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] <= 2


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one silently,
    while DVC refuses the file: the stages and DVC would read different params)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str, source: str = "params.yaml") -> Any:
    """Parse YAML text; a syntax error or a repeated key is one line with its line and column."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader: builds plain data only, never objects
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = (err.problem or err.context or "syntax error").strip()
        raise ParamsError(f"{source}: not valid YAML{where}: {what}; fix that line (indentation, a missing "
                          "colon or quote, a repeated key)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    finally:
        loader.dispose()
