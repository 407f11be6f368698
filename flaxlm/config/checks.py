"""Checking a config: setting one key from YAML or an override (type coercion, unknown keys
with a suggestion) and validating the values types cannot express. Every error is one
:class:`ConfigError` line that names the bad value and what was expected.

This module sits below flaxlm/config/sections.py and imports no flaxlm module: config.py holds the
dataclasses and ``CHOICES`` and hands them in (``validate(cfg, CHOICES)``); coercion reads the
dataclasses' own type hints. ``cfg`` below is a :class:`flaxlm.config.Config`.
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


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what was expected."""


def validate(cfg: Any, choices: dict[str, tuple[str, ...]], check_paths: bool = True) -> None:
    """Checks values that types cannot express. Raises ConfigError naming the bad value.

    ``choices`` maps ``section.key`` to its allowed values (flaxlm.config.CHOICES).
    """
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.d_model": m.d_model,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every,
        "checkpoint.keep": cfg.checkpoint.keep,
        "checkpoint.every": cfg.checkpoint.every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key, value in {
        "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches,
        "train.watchdog_factor": t.watchdog_factor,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0 (0 = off)")
    if t.watchdog_factor > 0 and t.watchdog_min_s <= 0:
        raise ConfigError(
            f"train.watchdog_min_s={t.watchdog_min_s:g} must be > 0 while the watchdog is on "
            f"(train.watchdog_factor={t.watchdog_factor:g}): it is the least time any phase "
            "may take; train.watchdog_factor=0 turns the watchdog off"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"
        )
    if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
            "(0 = as many as n_heads)"
        )
    _validate_moe(m)
    split = cfg.data.doc_split
    if split not in ("none", "blank_lines", "lines") and not (
        split.startswith("chars:") and split[6:].isdigit() and int(split[6:]) > 0
    ):
        raise ConfigError(
            f"data.doc_split={split!r} is not one of none, blank_lines, lines, chars:N (N > 0)"
        )
    if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"rope needs an even head dim, got d_model/n_heads={m.d_model // m.n_heads}"
        )
    if m.positions != "rope" and d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds the position table model.max_seq_len={m.max_seq_len}"
        )
    if m.causal_block < 0:
        raise ConfigError(f"model.causal_block={m.causal_block} must be >= 0 (0 = one block)")
    if t.head_chunk < 0:
        raise ConfigError(f"train.head_chunk={t.head_chunk} must be >= 0 (0 = plain logits)")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "expert", "tensor")}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
    for axis, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis}={v} must be a positive size or -1")
    for axis in ("data", "fsdp"):
        dcn, size = getattr(cfg.mesh, f"dcn_{axis}"), sizes[axis]
        if dcn < 1:
            raise ConfigError(f"mesh.dcn_{axis}={dcn} must be >= 1 (slices along mesh.{axis})")
        if size != -1 and size % dcn:
            raise ConfigError(
                f"mesh.dcn_{axis}={dcn} must divide mesh.{axis}={size} (slices along that axis)"
            )
    g = cfg.guard
    for key, value in {
        "guard.window": g.window,
        "guard.k_sigma": g.k_sigma,
        "guard.max_per_window": g.max_per_window,
    }.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if g.warmup < 2 or g.warmup > g.window:
        raise ConfigError(f"guard.warmup={g.warmup} must be in [2, guard.window={g.window}]")
    if g.known_good_after < 1:
        raise ConfigError(f"guard.known_good_after={g.known_good_after} must be >= 1")
    if not 0 < g.cooldown_factor <= 1:
        raise ConfigError(f"guard.cooldown_factor={g.cooldown_factor} must be in (0, 1]")
    _validate_objective(cfg)
    _validate_sources(d)
    _validate_ramp(t)
    _validate_stages(d)
    if not check_paths:
        return
    if d.prepared:  # the raw sources may not exist where training runs
        if not (Path(d.prepared) / "manifest.json").is_file():
            raise ConfigError(
                f"data.prepared={d.prepared!r} holds no manifest.json; expected a folder "
                "written by `flaxlm data prepare CONFIG --out DIR` (a finished one)"
            )
        return
    for p in d.paths:
        if not _source_exists(p):
            raise ConfigError(f"data.paths entry {p!r} does not exist")
    for i, s in enumerate(d.sources):
        if not _source_exists(s.path):
            raise ConfigError(f"data.sources[{i}].path {s.path!r} does not exist")
    if d.tokenizer and not Path(d.tokenizer).exists():
        raise ConfigError(
            f"data.tokenizer {d.tokenizer!r} does not exist; expected a sentencepiece .model, "
            "a tokenizer.json or an HF tokenizer directory"
        )


def _validate_moe(m: Any) -> None:
    moe = m.moe
    if moe.num_experts < 0:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} must be >= 0 (0 = dense)")
    if not moe.num_experts:
        return
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(
            f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts="
            f"{moe.num_experts}"
        )
    for key in ("capacity_factor", "router_z_loss", "load_balance_loss"):
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}={getattr(moe, key)} must be >= 0")
    if moe.every < 1:
        raise ConfigError(f"model.moe.every={moe.every} must be >= 1 (1 = every block)")
    if moe.every > 1 and m.scan_layers:
        raise ConfigError(
            f"model.moe.every={moe.every} needs model.scan_layers=false (a scan repeats one "
            "block: all MoE or all dense)"
        )


def _validate_objective(cfg: Any) -> None:
    """Ranges of the objective keys; what a family needs of them is its own check
    (``check_config`` in flaxlm/families/)."""
    ob = cfg.objective
    shares = {"objective.mlm": ob.mlm, "objective.causal": ob.causal}
    shares["objective.prefix_lm"] = ob.prefix_lm
    for key, value in shares.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0.0 < ob.mask_prob < 1.0:
        raise ConfigError(f"objective.mask_prob={ob.mask_prob} must be in (0, 1)")
    if ob.mask_token_prob < 0 or ob.random_token_prob < 0:
        raise ConfigError("objective.mask_token_prob and random_token_prob must be >= 0")
    if ob.mask_token_prob + ob.random_token_prob > 1.0:
        raise ConfigError(
            f"objective.mask_token_prob + random_token_prob = "
            f"{ob.mask_token_prob + ob.random_token_prob} must be <= 1"
        )
    if ob.max_predictions < 0:
        raise ConfigError(f"objective.max_predictions={ob.max_predictions} must be >= 0")


def _validate_sources(d: Any) -> None:
    if not 0.0 < d.tokenizer_character_coverage <= 1.0:
        raise ConfigError(
            f"data.tokenizer_character_coverage={d.tokenizer_character_coverage} must be in (0, 1]"
        )
    if d.tokenizer_specials and not d.tokenizer:
        raise ConfigError(
            "data.tokenizer_specials maps the specials of a given model; set data.tokenizer too"
        )
    if d.paths and d.sources:
        raise ConfigError("set data.paths or data.sources, not both (paths = one source)")
    names = set()
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(
                f"data.sources[{i}].path is empty; expected a file, folder or tfds:NAME"
            )
        if not s.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight={s.weight} must be > 0")
        name = source_name(s)
        if name in names:
            raise ConfigError(
                f"data.sources[{i}] name {name!r} is used twice; set data.sources[{i}].name"
            )
        names.add(name)


def _validate_ramp(t: Any) -> None:
    """``train.batch_ramp``: [position, size] pairs from position 0 up, sizes in
    [1, batch_size] divisible by grad_accum, the last = batch_size. The mesh's divisibility is
    checked where the mesh is built (flaxlm/train/batches.py)."""
    last, ramp = -1, t.batch_ramp
    for i, entry in enumerate(ramp):
        where = f"train.batch_ramp[{i}]={entry}"
        if len(entry) != 2 or entry[0] <= last or (i == 0 and entry[0] != 0):
            raise ConfigError(
                f"{where} should be a pair [data position, batch size], positions from 0 up"
            )
        if not 0 < entry[1] <= t.batch_size or entry[1] % t.grad_accum:
            raise ConfigError(
                f"{where}: the batch size must be in [1, train.batch_size={t.batch_size}] and "
                f"divisible by train.grad_accum={t.grad_accum}"
            )
        last = entry[0]
    if ramp and ramp[-1][1] != t.batch_size:
        raise ConfigError(
            f"train.batch_ramp[{len(ramp) - 1}]={ramp[-1]}: the last batch size must be "
            f"train.batch_size={t.batch_size} (the full batch)"
        )


def _validate_stages(d: Any) -> None:
    """``data.stages``: a mixture's weights by source name, from increasing steps > 0."""
    if d.stages and len(d.sources) < 2:
        raise ConfigError(
            f"data.stages needs a mixture (data.sources with 2 or more sources), got "
            f"{len(d.sources)} source(s)"
        )
    names, last = [source_name(s) for s in d.sources], 0
    for i, stage in enumerate(d.stages):
        if stage.step <= last:
            raise ConfigError(f"data.stages[{i}].step={stage.step} must be > {last}")
        last = stage.step
        unknown = [n for n in stage.weights if n not in names]
        if unknown:
            raise ConfigError(
                f"data.stages[{i}].weights names {unknown[0]!r}, not one of {', '.join(names)}"
            )
        if any(w < 0 for w in stage.weights.values()) or not sum(stage.weights.values()) > 0:
            raise ConfigError(f"data.stages[{i}].weights={stage.weights} must be >= 0, one > 0")


def _source_exists(path: str) -> bool:
    # TFDS datasets are looked up (and explained when missing) by flaxlm.data.tfds_source.
    return path.startswith("tfds:") or Path(path.removeprefix("hf:")).exists()


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
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}{_suggest(section, sections)}")
    target = getattr(cfg, section)
    if not name:
        if not allow_section or not isinstance(value, dict):
            raise ConfigError(f"{section!r} must be a mapping of keys, got {value!r}")
        for sub, v in value.items():
            set_key(cfg, f"{section}.{sub}", v)
        return
    prefix = section
    while True:  # nested sections: train.distributed.process_id
        head, _, rest = name.partition(".")
        fields = {f.name: f for f in dataclasses.fields(target)}
        if head not in fields:
            full = [f"{prefix}.{n}" for n in fields]
            raise ConfigError(f"unknown config key {key!r}{_suggest(f'{prefix}.{head}', full)}")
        hint = typing.get_type_hints(type(target))[head]
        if not rest:
            setattr(target, head, _coerce(key, value, hint))
            return
        if not dataclasses.is_dataclass(hint):
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
    hints = typing.get_type_hints(cls)
    out = cls()
    for name, v in value.items():
        if name not in fields:
            full = [f"{key}.{n}" for n in fields]
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
