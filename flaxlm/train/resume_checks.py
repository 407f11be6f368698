"""What a resume may change. Resuming continues the newest checkpoint's run, so a config that
would make it another run — another model, tokenizer, data (or the same paths with other
content), seed, batch size, sequence length, objective or optimizer — is refused with one line
naming the key and both values, unless ``train.allow_config_change=true``; an accepted change
is an event in metrics.jsonl. The keys in :data:`SAFE_KEYS` are accepted silently.

    resume = ResumeCheck(cfg)                   # refuses changed keys (a fresh run: nothing)
    data = prepare_data(cfg.data, vocab, progress, resume.tokenizer)   # the checkpoint's own
    resume.check_data(data.fingerprints)        # refuses changed content
    ...
    resume.record(log, step)                    # accepted changes: an event in metrics.jsonl

The comparison is against the resolved config in the newest checkpoint's metadata (the run's
``config.yaml`` is rewritten only after the checks pass), and the data content against
``RUN_DIR/data_fingerprints.json``: per source, a SHA-256 of its files' doc ids, sizes and
contents (flaxlm/data/fingerprints.py), so moving the corpus is a change of ``data.paths`` alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flaxlm import storage
from flaxlm.checkpoint.manager import Checkpointer, CheckpointError, tokenizer_bytes_from_meta
from flaxlm.config import Config, ConfigError, section_items, to_dict
from flaxlm.tokenizers.sentencepiece import Tokenizer
from flaxlm.train.metrics_log import MetricsLog

FINGERPRINTS_FILE = "data_fingerprints.json"

# What may change on a resume without changing what the run computes: how long it runs (the
# schedule follows train.steps when optim.decay_steps is 0: see the README), how it is
# logged, evaluated, saved, watched and placed on devices; memory / speed options with the same
# math (micro-batches, remat, attention kernel, chunked head); the guard's thresholds (they
# decide when to roll back, not what a step computes); where the cache lives; injected faults.
SAFE_KEYS = (
    "train.steps",
    "train.run_dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.eval_tasks",
    "train.eval_tasks_every",
    "train.progress",
    "train.profile_steps",
    "train.profile_hosts",
    "train.watchdog_factor",
    "train.watchdog_min_s",
    "train.distributed",
    "train.allow_config_change",
    "train.grad_accum",
    "train.head_chunk",
    "model.remat",
    "model.attention_impl",
    "model.causal_block",
    "model.custom_backward",
    "data.cache_dir",
    "data.tfds_data_dir",
    "mesh",
    "checkpoint",
    "guard",
    "chaos",
    "logging",
)


class ResumeRefused(ConfigError):
    """A resume would change the run; the message names the key and both values."""


def is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_KEYS)


def config_changes(saved: dict[str, Any], new: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, new value)}`` for every key outside :data:`SAFE_KEYS`
    whose value differs. ``saved`` is a resolved config as nested dicts (a checkpoint's
    ``meta["config"]``); keys it lacks (written before they existed) count as their defaults.

    A checkpoint whose config has no data (``flaxlm convert from-hf``, fine-tuning tools)
    holds weights only: then only the ``model`` keys must match.
    """
    template = Config()
    defaults = _leaves(to_dict(template), template)
    old = {k: defaults[k] if v is _MISSING else v for k, v in _leaves(saved, template).items()}
    new_values = _leaves(to_dict(new), template)
    weights_only = not old["data.paths"] and not old["data.sources"]
    changes = {
        key: (old[key], value)
        for key, value in new_values.items()
        if not is_safe(key)
        and not (weights_only and not key.startswith("model."))
        and old[key] != value
    }
    # decay_steps 0 means train.steps: setting it to the old train.steps while raising
    # train.steps keeps the schedule, so it is no change.
    decay = [v["optim.decay_steps"] or v["train.steps"] for v in (old, new_values)]
    if decay[0] == decay[1]:
        changes.pop("optim.decay_steps", None)
    return changes


def content_changes(
    saved: dict[str, str] | None, new: dict[str, str], single_source: bool
) -> dict[str, tuple[str, str]]:
    """The sources whose content fingerprint differs from the saved one, as
    ``{"data.content" or "data.content.<source>": (old, new)}`` (hashes shortened). Sources
    only one side has are a change of data.paths / data.sources, reported there."""
    changes = {}
    for name, digest in new.items():
        before = (saved or {}).get(name)
        if before is not None and before != digest:
            key = "data.content" if single_source else f"data.content.{name}"
            changes[key] = (f"sha256:{before[:12]}", f"sha256:{digest[:12]}")
    return changes


class ResumeCheck:
    """The checks of one start of ``cfg.train.run_dir``; a fresh run passes them all."""

    def __init__(self, cfg: Config):
        self.cfg, self.run_dir = cfg, storage.native(cfg.train.run_dir)
        meta = newest_meta(self.run_dir, cfg.checkpoint.local_dir or None)
        self.resuming = meta is not None
        self.tokenizer = (
            Tokenizer.from_bytes(tokenizer_bytes_from_meta(meta), "of the checkpoint")
            if meta is not None and "tokenizer_b64" in meta
            else None
        )
        self.changes: dict[str, tuple[Any, Any]] = {}
        if meta is not None and "config" in meta:
            self._accept(config_changes(meta["config"], cfg))

    def check_data(self, fingerprints: dict[str, str]) -> None:
        """Refuses (or records) changed data content; ``fingerprints`` are the prepared
        data's (:attr:`flaxlm.data.PreparedData.fingerprints`)."""
        if self.resuming:
            single = not self.cfg.data.sources
            self._accept(content_changes(read_fingerprints(self.run_dir), fingerprints, single))

    def record(self, log: MetricsLog, step: int) -> None:
        """Logs the accepted changes of a resume at ``step``: a ``config_change`` event line
        in metrics.jsonl, and a line on the console."""
        if not self.changes:
            return
        changed = {key: list(values) for key, values in self.changes.items()}
        log.write({"event": "config_change", "step": step, "changed": changed})
        if log.enabled:
            named = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in self.changes.items())
            print(f"resuming with a changed config (train.allow_config_change): {named}")

    def _accept(self, changes: dict[str, tuple[Any, Any]]) -> None:
        if changes and not self.cfg.train.allow_config_change:
            raise ResumeRefused(refusal(self.run_dir, changes))
        self.changes |= changes


def refusal(run_dir: str | Path, changes: dict[str, tuple[Any, Any]]) -> str:
    """The one-line error naming the first changed key, both values, and the other keys."""
    (key, (old, new)), *others = changes.items()
    more = f" (and {', '.join(k for k, _ in others)})" if others else ""
    return (
        f"resuming {run_dir} would change {key} from {_show(old)} (the checkpoint's) to "
        f"{_show(new)}{more}; set train.allow_config_change=true to accept"
    )


def newest_meta(run_dir: Path | str, local_dir: str | None = None) -> dict[str, Any] | None:
    """The metadata of the newest checkpoint whose metadata is readable (in the run dir or
    the local tier ``local_dir``), or None. Cheap: no checksums (the restore verifies the
    checkpoint; its config is the run's either way)."""
    if local_dir is None and not storage.exists(storage.join(str(run_dir), "checkpoints")):
        return None
    ckpt = Checkpointer(run_dir, asynchronous=False, local_dir=local_dir)
    try:
        for step in reversed(ckpt.steps()):
            try:
                return ckpt.read_meta(step)
            except CheckpointError:
                continue  # the resume walks past it too
        return None
    finally:
        ckpt.close()


def read_fingerprints(run_dir: Path | str) -> dict[str, str] | None:
    try:
        return json.loads(storage.read_text(storage.join(str(run_dir), FINGERPRINTS_FILE)))
    except FileNotFoundError:
        return None  # a run dir from before fingerprints: nothing to compare
    except ValueError:
        return None


def write_fingerprints(run_dir: Path | str, fingerprints: dict[str, str]) -> None:
    text = json.dumps(fingerprints, indent=1, sort_keys=True)
    storage.write_text(storage.join(str(run_dir), FINGERPRINTS_FILE), text)


_MISSING = object()


def _leaves(tree: Any, template: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` of a config as nested dicts, at the keys of ``template``
    (a config dataclass); a key ``tree`` lacks maps to _MISSING."""
    out: dict[str, Any] = {}
    for name, sub in section_items(template):  # fields and registered sections
        key = f"{prefix}{name}"
        value = tree.get(name, _MISSING) if isinstance(tree, dict) else _MISSING
        if dataclasses.is_dataclass(sub):
            out |= _leaves(value, sub, key + ".")
        else:
            out[key] = value
    return out


def _show(value: Any) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
