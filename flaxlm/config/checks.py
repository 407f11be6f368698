"""Setting one config key from YAML or an override: type coercion from the dataclasses' own
type hints, unknown keys with a suggestion. Every error is one :class:`ConfigError` line that
names the bad value and what was expected; the checks of values live in validation.py.

Keys are the dataclasses' fields plus the sections registered in registry.py (a family's
``objective``, ``model.smoothing``), so a registered section loads like a built-in one.
``cfg`` below is a :class:`flaxlm.config.Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from flaxlm.config.registry import section_types


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what was expected."""


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is a ConfigError naming ``where`` (a file or
    an override) and, in a file, the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        multiline = "\n" in text.strip()  # a one-line override is quoted whole instead
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark and multiline else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def set_key(cfg: Any, key: str, value: Any, allow_section: bool = False) -> None:
    """Sets ``section.key[.sub...]`` of ``cfg`` to ``value``, coerced to the field's type.

    With ``allow_section``, ``key`` may name a whole section and ``value`` map its keys.
    """
    section, _, name = key.partition(".")
    sections = section_types(cfg)
    if section not in sections:
        hint = _suggest(section, sections) or (
            " (a family's own section? import flaxlm.families, or your family's module, "
            "before loading the config)"
        )
        raise ConfigError(f"unknown config section {section!r}{hint}")
    target = getattr(cfg, section)
    if not name:
        if not allow_section or not isinstance(value, dict):
            raise ConfigError(f"{section!r} must be a mapping of keys, got {value!r}")
        for sub, v in value.items():
            set_key(cfg, f"{section}.{sub}", v)
        return
    prefix = section
    while True:  # nested sections: train.distributed.process_id, model.smoothing.window
        head, _, rest = name.partition(".")
        hints = section_types(target)
        if head not in hints:
            full = [f"{prefix}.{n}" for n in hints]
            raise ConfigError(f"unknown config key {key!r}{_suggest(f'{prefix}.{head}', full)}")
        if not rest:
            setattr(target, head, _coerce(key, value, hints[head]))
            return
        if not dataclasses.is_dataclass(hints[head]):
            raise ConfigError(f"unknown config key {key!r}: {prefix}.{head} has no sub-keys")
        target, name, prefix = getattr(target, head), rest, f"{prefix}.{head}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(hint)[:1]
        if isinstance(value, str | int | float | dict) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} should be a list, got {type(value).__name__}")
        if dataclasses.is_dataclass(item_type):
            return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
        return [_coerce(key, v, item_type) for v in value]
    if origin is dict:
        if value is None or value == "":
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} should be a mapping, got {type(value).__name__}")
        key_type, value_type = typing.get_args(hint)
        return {
            _coerce(key, k, key_type): _coerce(f"{key}.{k}", v, value_type)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return _coerce_dataclass(key, value, hint)
    if isinstance(hint, types.UnionType):
        raise TypeError(f"unsupported config type {hint} for {key}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"{key}={value!r} should be of type {hint.__name__}, got {type(value).__name__}"
    )


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce_dataclass(key: str, value: Any, cls: type) -> Any:
    """A dict -> the dataclass, field by field. A bare string stands for ``{path: string}``
    where the dataclass has a ``path`` field (SourceConfig: ``data.sources=[a.txt, b.txt]``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if isinstance(value, str) and "path" in fields:
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} should be a mapping, got {type(value).__name__}")
    out = cls()
    hints = section_types(out)
    for name, v in value.items():
        if name not in hints:
            full = [f"{key}.{n}" for n in hints]
            raise ConfigError(f"unknown config key '{key}.{name}'{_suggest(f'{key}.{name}', full)}")
        setattr(out, name, _coerce(f"{key}.{name}", v, hints[name]))
    return out


def _suggest(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def source_name(source: Any) -> str:
    """A SourceConfig's name: ``name`` if set, else the file / folder / TFDS name without
    suffixes."""
    if source.name:
        return source.name
    if source.path.startswith("tfds:"):
        return source.path[len("tfds:") :].split(":")[0].split("/")[0]
    base = Path(source.path.removeprefix("hf:").rstrip("/")).name or source.path
    return base.split(".")[0] or base
