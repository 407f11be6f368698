"""Checking a config's values where types cannot: one check per section, composed by
:func:`validate`, then the checks of the registered sections (registry.py). Each raises one
:class:`ConfigError` line naming the bad value and the expected one.

A check that relates two sections sits with the key it reports (``data.seq_len`` against
``model.max_seq_len`` is a data check). What a family needs beyond these (BERT: one share
> 0) is its own ``check_config``, run when the family is resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxlm import storage
from flaxlm.config.checks import ConfigError, source_name
from flaxlm.config.registry import registered_sections, section_choices


def validate(cfg: Any, choices: dict[str, tuple[str, ...]], check_paths: bool = True) -> None:
    """Checks values that types cannot express. Raises ConfigError naming the bad value.

    ``choices`` maps ``section.key`` to its allowed values (flaxlm.config.CHOICES); the
    registered sections' choices are added. ``check_paths=False`` skips the data-path checks
    (a checkpoint's data may live on another machine).
    """
    check_choices(cfg, choices | section_choices())
    for check in (
        _check_model,
        _check_moe,
        _check_data,
        _check_sources,
        _check_stages,
        _check_optim,
        _check_train,
        _check_ramp,
        _check_mesh,
        _check_checkpoint,
        _check_guard,
    ):
        check(cfg)
    for section in registered_sections():
        if section.check is not None:
            section.check(cfg)
    if check_paths:
        _check_paths(cfg.data)


def check_choices(cfg: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Each ``a.b.key`` of ``choices`` holds one of its allowed values."""
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def require(values: dict[str, Any], test: Any, expected: str) -> None:
    """Raises ``key=value must be <expected>`` for the first value failing ``test``."""
    for key, value in values.items():
        if not test(value):
            raise ConfigError(f"{key}={value} must be {expected}")


def _positive(v: Any) -> bool:
    return v > 0


def _check_model(cfg: Any) -> None:
    m = cfg.model
    require(
        {f"model.{k}": getattr(m, k) for k in
         ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")},
        _positive, "> 0",
    )  # fmt: skip
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"
        )
    if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
            "(0 = as many as n_heads)"
        )
    if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"rope needs an even head dim, got d_model/n_heads={m.d_model // m.n_heads}"
        )
    if m.causal_block < 0:
        raise ConfigError(f"model.causal_block={m.causal_block} must be >= 0 (0 = one block)")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")


def _check_moe(cfg: Any) -> None:
    m = cfg.model
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
    for key in ("capacity_factor", "router_z_loss", "load_balance_loss", "shared_experts",
                "d_expert", "bias_update_rate"):  # fmt: skip
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}={getattr(moe, key)} must be >= 0")
    expert_shards = getattr(cfg.mesh, "expert", 1)
    if expert_shards > 1 and moe.num_experts % expert_shards:
        raise ConfigError(
            f"model.moe.num_experts={moe.num_experts} must be a multiple of mesh.expert="
            f"{expert_shards} (each expert shard holds the same number of experts)"
        )
    if moe.every < 1:
        raise ConfigError(f"model.moe.every={moe.every} must be >= 1 (1 = every block)")
    if moe.every > 1 and m.scan_layers:
        raise ConfigError(
            f"model.moe.every={moe.every} needs model.scan_layers=false (a scan repeats one "
            "block: all MoE or all dense)"
        )


def _check_data(cfg: Any) -> None:
    d, m = cfg.data, cfg.model
    if d.seq_len <= 0:
        raise ConfigError(f"data.seq_len={d.seq_len} must be > 0")
    split = d.doc_split
    if split not in ("none", "blank_lines", "lines") and not (
        split.startswith("chars:") and split[6:].isdigit() and int(split[6:]) > 0
    ):
        raise ConfigError(
            f"data.doc_split={split!r} is not one of none, blank_lines, lines, chars:N (N > 0)"
        )
    if m.positions != "rope" and d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds the position table model.max_seq_len={m.max_seq_len}"
        )
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    if not 0.0 < d.tokenizer_character_coverage <= 1.0:
        raise ConfigError(
            f"data.tokenizer_character_coverage={d.tokenizer_character_coverage} must be in (0, 1]"
        )
    if d.tokenizer_specials and not d.tokenizer:
        raise ConfigError(
            "data.tokenizer_specials maps the specials of a given model; set data.tokenizer too"
        )


def _check_sources(cfg: Any) -> None:
    """``data.sources``: a mixture instead of ``data.paths``, with distinct names."""
    d = cfg.data
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


def _check_stages(cfg: Any) -> None:
    """``data.stages``: a mixture's weights by source name, from increasing steps > 0."""
    d = cfg.data
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


def _check_optim(cfg: Any) -> None:
    o = cfg.optim
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")


def _check_train(cfg: Any) -> None:
    t = cfg.train
    require(
        {f"train.{k}": getattr(t, k) for k in ("steps", "batch_size", "grad_accum", "log_every")},
        _positive, "> 0",
    )  # fmt: skip
    require(
        {f"train.{k}": getattr(t, k) for k in ("eval_every", "eval_batches", "watchdog_factor")},
        lambda v: v >= 0, ">= 0 (0 = off)",
    )  # fmt: skip
    if t.watchdog_factor > 0 and t.watchdog_min_s <= 0:
        raise ConfigError(
            f"train.watchdog_min_s={t.watchdog_min_s:g} must be > 0 while the watchdog is on "
            f"(train.watchdog_factor={t.watchdog_factor:g}): it is the least time any phase "
            "may take; train.watchdog_factor=0 turns the watchdog off"
        )
    if t.head_chunk < 0:
        raise ConfigError(f"train.head_chunk={t.head_chunk} must be >= 0 (0 = plain logits)")
    p = t.profile_steps
    if p and not (len(p) == 2 and 1 <= p[0] < p[1]):
        raise ConfigError(
            f"train.profile_steps={p} must be [start, stop] with 1 <= start < stop ([] = no trace)"
        )
    if any(h < 0 for h in t.profile_hosts):
        raise ConfigError(f"train.profile_hosts={t.profile_hosts} must hold process indices >= 0")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )


def _check_ramp(cfg: Any) -> None:
    """``train.batch_ramp``: [position, size] pairs from position 0 up, sizes in
    [1, batch_size] divisible by grad_accum, the last = batch_size. The mesh's divisibility is
    checked where the mesh is built (flaxlm/train/batches.py)."""
    t = cfg.train
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


def _check_mesh(cfg: Any) -> None:
    """At most one axis is -1 (it fills); each dcn factor divides its axis."""
    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "expert", "context", "tensor")}
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


def _check_checkpoint(cfg: Any) -> None:
    c = cfg.checkpoint
    require({"checkpoint.keep": c.keep, "checkpoint.every": c.every}, _positive, "> 0")
    if c.local_every < 0:
        raise ConfigError(
            f"checkpoint.local_every={c.local_every} must be >= 0 (0 = no local tier)"
        )
    if c.local_every and not c.local_dir:
        raise ConfigError(
            f"checkpoint.local_every={c.local_every} needs checkpoint.local_dir "
            "(a node-local folder)"
        )


def _check_guard(cfg: Any) -> None:
    g = cfg.guard
    require(
        {f"guard.{k}": getattr(g, k) for k in ("window", "k_sigma", "max_per_window")},
        _positive, "> 0",
    )  # fmt: skip
    if g.warmup < 2 or g.warmup > g.window:
        raise ConfigError(f"guard.warmup={g.warmup} must be in [2, guard.window={g.window}]")
    if g.known_good_after < 1:
        raise ConfigError(f"guard.known_good_after={g.known_good_after} must be >= 1")
    if not 0 < g.cooldown_factor <= 1:
        raise ConfigError(f"guard.cooldown_factor={g.cooldown_factor} must be in (0, 1]")


def _check_paths(d: Any) -> None:
    """The data a run reads exists here: the prepared corpus, or the sources and tokenizer."""
    if d.prepared:  # the raw sources may not exist where training runs
        if not storage.exists(storage.join(d.prepared, "manifest.json")):  # a folder or a URL
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


def _source_exists(path: str) -> bool:
    # TFDS datasets are looked up (and explained when missing) by flaxlm.data.tfds_source.
    return path.startswith("tfds:") or storage.exists(path.removeprefix("hf:"))
