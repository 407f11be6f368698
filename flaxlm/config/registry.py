"""Config sections that live outside the config package, registered at import time.

A model family owns the settings only it reads (BERT's ``objective``, a user family's
``model.smoothing``). The config package cannot import them: config is the bottom floor,
and the section's dataclass lives with the lowest module that consumes it. So the family entry
hands its sections to :func:`register_section` (``register_family`` does this for
``Family.config_sections``), and loading, overrides, ``to_dict``, validation and
``flaxlm config show`` look them up here:

    @dataclass(unsafe_hash=True)  # under ``model``: hashable, as ModelConfig
    class SmoothingConfig:
        window: int = 4

    register_section(ConfigSection("model.smoothing", SmoothingConfig, check=...))
    cfg = load_config(None, ["model.smoothing.window=8"])
    cfg.model.smoothing.window  # 8

A section is a top-level name (``objective``) or a name under a core section that is a
:class:`SectionHost` (``model.<name>``). Registered sections are part of every config built
after the registration, whichever family it selects, so a run dir written by any family loads
back as long as the same families are imported (``import flaxlm.families`` registers the
built-in ones; the CLI and the trainer import it before reading a config).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ConfigSection:
    """One registered section.

    - ``path``: ``name`` (top level) or ``host.name`` (``model.smoothing``).
    - ``cls``: its dataclass; defaults in its fields, type hints drive YAML coercion. It must
      be mutable (overrides set its fields); under a hashable host (``model``) it must be
      hashable too: ``@dataclass(unsafe_hash=True)``.
    - ``check(cfg)``: raises ConfigError (one line naming the key) for values its types cannot
      express; it sees the whole config, so it may relate the section to others.
    - ``choices``: the allowed values of its string keys, by key within the section
      (``{"mode": ("mean", "median")}``).
    """

    path: str
    cls: type
    check: Callable[[Any], None] | None = None
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


_SECTIONS: dict[str, ConfigSection] = {}
_HOSTS: dict[str, type] = {}  # "" = Config, "model" = ModelConfig: where sections may go


def register_section(section: ConfigSection, replace: bool = False) -> ConfigSection:
    """Adds ``section`` to every config built from now on. Registering the same section again
    is a no-op; another one at a taken path raises unless ``replace``. Returns it."""
    host_path, _, name = section.path.rpartition(".")
    host = _HOSTS.get(host_path)
    if host is None or not name.isidentifier():
        raise ValueError(
            f"config section {section.path!r}: expected a name or one under "
            f"{', '.join(p for p in _HOSTS if p)} (e.g. 'objective', 'model.my_section')"
        )
    if name in {f.name for f in dataclasses.fields(host)}:
        raise ValueError(f"config section {section.path!r} is a built-in key")
    if not dataclasses.is_dataclass(section.cls) or section.cls.__dataclass_params__.frozen:
        raise TypeError(f"config section {section.path!r}: cls must be a mutable dataclass")
    if host.__hash__ is not None and section.cls.__hash__ is None:
        raise TypeError(
            f"config section {section.path!r} sits in a hashable {host.__name__}: declare "
            f"{section.cls.__name__} with @dataclass(unsafe_hash=True)"
        )
    taken = _SECTIONS.get(section.path)
    if taken is not None and taken != section and not replace:
        raise ValueError(f"config section {section.path!r} is already registered")
    _SECTIONS[section.path] = section
    return section


def registered_sections() -> tuple[ConfigSection, ...]:
    """Every registered section, in registration order."""
    return tuple(_SECTIONS.values())


def sections_under(host_path: str) -> dict[str, ConfigSection]:
    """``{name: section}`` of the sections registered directly under ``host_path``."""
    prefix = f"{host_path}." if host_path else ""
    return {
        path[len(prefix) :]: s
        for path, s in _SECTIONS.items()
        if path.startswith(prefix) and "." not in path[len(prefix) :]
    }


def section_choices() -> dict[str, tuple[str, ...]]:
    """The registered sections' choices by full key (``model.smoothing.mode``)."""
    return {f"{s.path}.{k}": v for s in _SECTIONS.values() for k, v in s.choices.items()}


class SectionHost:
    """A config dataclass that also holds registered sections as attributes.

    They are kept in its last field, ``extra_sections`` (``(name, value)`` pairs: a tuple, so
    a hashable host such as ModelConfig stays a valid static jit argument and compares by
    them), and read and set like fields: ``cfg.objective.mlm = 0.5``. Subclasses name their
    path: ``class ModelConfig(SectionHost, path="model")``.
    """

    section_path: ClassVar[str]
    extra_sections: tuple[tuple[str, Any], ...]

    def __init_subclass__(cls, path: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section_path = path
        _HOSTS[path] = cls

    def __post_init__(self) -> None:
        # Lists and dicts come back from JSON / asdict (HF exports keep a ModelConfig so).
        given = dict(getattr(self, "extra_sections", ()) or ())
        registered = sections_under(self.section_path)
        pairs = []
        for name, value in given.items():
            if isinstance(value, dict) and name in registered:
                value = registered[name].cls(**value)
            pairs.append((name, value))
        pairs += [(n, s.cls()) for n, s in registered.items() if n not in given]
        object.__setattr__(self, "extra_sections", tuple(pairs))

    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails; dunder lookups (pickle, copy) must fail fast.
        pairs = self.__dict__.get("extra_sections") if not name.startswith("_") else None
        if pairs is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        for key, value in pairs:
            if key == name:
                return value
        section = sections_under(self.section_path).get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = section.cls()  # registered after this config was built: its defaults
        object.__setattr__(self, "extra_sections", (*pairs, (name, value)))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        pairs = self.__dict__.get("extra_sections")
        if pairs is None or name in self.__dataclass_fields__:
            object.__setattr__(self, name, value)
        elif any(key == name for key, _ in pairs):
            pairs = tuple((k, value if k == name else v) for k, v in pairs)
            object.__setattr__(self, "extra_sections", pairs)
        elif name in sections_under(self.section_path):
            object.__setattr__(self, "extra_sections", (*pairs, (name, value)))
        else:
            object.__setattr__(self, name, value)


def section_items(obj: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of a config dataclass's keys: its fields, then (for a SectionHost)
    its registered sections. What ``to_dict`` and the resume checks walk."""
    items = [
        (f.name, getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if f.name != "extra_sections"
    ]
    if isinstance(obj, SectionHost):
        for name in sections_under(obj.section_path):
            getattr(obj, name)  # fills in the defaults of a section registered since
        items += list(obj.extra_sections)
    return items


def section_types(obj: Any) -> dict[str, Any]:
    """``{key: type}`` of a config dataclass's keys (fields and registered sections): what
    ``set_key`` coerces a value to, and the names an unknown key is matched against."""
    hints = typing.get_type_hints(type(obj))
    hints.pop("extra_sections", None)
    hints.pop("section_path", None)
    if isinstance(obj, SectionHost):
        hints |= {name: s.cls for name, s in sections_under(obj.section_path).items()}
    return hints
