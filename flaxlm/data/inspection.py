"""``flaxlm data inspect``: what a config's data looks like before any training.

    cfg = load_config("configs/gpt_demo.yaml")
    report = inspect_data(cfg, family_of(cfg))   # flaxlm.families.family_of
    print(format_report(report))

Prepares the data (tokenizing once into the cache if needed), then reports per source: files
and bytes on disk, documents and tokens per split, weight, packed examples and the epochs a run
of ``train.steps`` consumes; the tokenizer and its special ids; the cache location; and a
decoded sample of the batch of ``step``, made by the family's own batch maker (the one training
calls, with the run's batch ramp and mixture stages): for GPT, packed rows with
document boundaries (where ``loss_mask`` is 0) marked; for BERT, the masked rows with every
predicted position shown as ``⟦original→input⟧`` (plus the NSP label, or the objective and
prefix length of unified rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flaxlm.config import Config
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.cache import PreparedData, prepare_data
from flaxlm.data.causal_batches import CausalBatches
from flaxlm.data.masked_batches import OBJECTIVES, layout_of
from flaxlm.data.mixture import MixtureBatches
from flaxlm.data.prepared_reader import read_manifest
from flaxlm.data.sources import SourceSpec, list_source_files, resolve_sources

BOUNDARY = " ‖ "  # shown between documents packed into one row


def inspect_data(
    cfg: Config, family: Any, step: int = 0, rows: int = 2, progress: bool = False
) -> dict:
    """A JSON-ready report of the config's data (see the module doc).

    ``family``: the config's entry of the family table (flaxlm/families). Its own batch maker
    (``family.train_batches``, given the run's BatchRamp) makes the batch of ``step``, so the
    sample is exactly what training sees there; ``family.inspect_sample(cfg, prepared, batch,
    rows)`` decodes ``rows`` rows of it (:func:`causal_sample`, :func:`masked_sample`).
    """
    d = cfg.data
    specs = None if d.prepared else resolve_sources(d)  # once, for the cache and the sizes
    prepared = prepare_data(d, cfg.model.vocab_size, progress=progress, sources=specs)
    ramp = BatchRamp.from_config(cfg.train)
    batches = family.train_batches(prepared, cfg, ramp)
    sources = []
    for i, (raw, source) in enumerate(zip(_raw_sources(d, specs), prepared.sources, strict=True)):
        n_examples = CausalBatches(source.train, d.seq_len, 1, 0).n_examples
        rows_per_run = _rows_per_run(batches, ramp, prepared, cfg.train.steps, i)
        sources.append(
            {
                "name": source.name,
                **raw,
                "weight": source.weight,
                "train_docs": source.train.n_docs,
                "val_docs": source.val.n_docs,
                "empty_docs": source.n_empty_docs,
                "train_tokens": source.train.n_tokens,
                "val_tokens": source.val.n_tokens,
                "train_examples": n_examples,
                "epochs_per_run": rows_per_run / max(n_examples, 1),
            }
        )
    sample = family.inspect_sample(cfg, prepared, batches.batch(step), rows)
    return {
        "cache_dir": str(prepared.cache_dir),
        "cache_hit": prepared.cache_hit,
        "tokenizer": _tokenizer_report(prepared),
        "seq_len": d.seq_len,
        "batch_size": cfg.train.batch_size,
        "sources": sources,
        "sample": {"step": step, **sample},
    }


def _raw_sources(d: Any, specs: list[SourceSpec] | None) -> list[dict]:
    """Per source: its paths, field, and the number and bytes of its files (for a prepared
    corpus as recorded in its manifest: the raw text need not be here)."""
    if d.prepared:
        manifest = read_manifest(d.prepared)
        out = []
        for i, info in enumerate(manifest["sources"]):
            files = [f for u in manifest["units"] if u["source"] == i for f in u["files"]]
            out.append({"paths": info["paths"], "field": info.get("field", ""),
                        "files": len(files), "bytes": sum(f["size"] for f in files)})  # fmt: skip
        return out
    out = []
    for spec in specs or []:
        files = list_source_files(spec.paths, d.tfds_data_dir)
        out.append({"paths": list(spec.paths), "field": spec.field, "files": len(files),
                    "bytes": sum(f.path.stat().st_size for f in files)})  # fmt: skip
    return out


def _rows_per_run(
    batches: Any, ramp: BatchRamp, prepared: PreparedData, steps: int, index: int
) -> float:
    """Rows source ``index`` gets in the first ``steps`` batches: a mixture counts them; other
    batches draw from all sources' train tokens alike."""
    if isinstance(batches, MixtureBatches):
        return float(batches.rows_before(steps)[index])
    share = prepared.sources[index].train.n_tokens / max(prepared.train.n_tokens, 1)
    return float(ramp.offset(steps)) * share


def _tokenizer_report(prepared: PreparedData) -> dict[str, Any]:
    tok = prepared.tokenizer
    specials = {
        role: getattr(tok, f"{role}_id")
        for role in ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
    }
    return {"source": tok.source, "vocab_size": tok.vocab_size, "special_ids": specials}


def causal_sample(
    cfg: Config, prepared: PreparedData, batch: dict[str, np.ndarray], rows: int
) -> dict[str, Any]:
    """The first ``rows`` rows of a causal training ``batch``, documents separated."""
    names = [s.name for s in prepared.sources]
    out = []
    for r in range(min(rows, len(batch["inputs"]))):
        segments = batch["segment_ids"][r]
        texts = [
            prepared.tokenizer.decode(batch["inputs"][r][segments == seg].tolist())
            for seg in np.unique(segments)
        ]
        source = int(batch["source_ids"][r, 0]) if "source_ids" in batch else 0
        out.append(
            {
                "source": names[source],
                "documents": len(texts),
                "predicted": int(batch["loss_mask"][r].sum()),
                "text": BOUNDARY.join(texts),
            }
        )
    return {"objective": "causal", "rows": out}


def masked_sample(
    cfg: Config, prepared: PreparedData, batch: dict[str, np.ndarray], rows: int
) -> dict[str, Any]:
    """The first ``rows`` rows of a BERT training ``batch``, predicted positions marked."""
    tok = prepared.tokenizer
    layout = layout_of(cfg)
    out = []
    for r in range(min(rows, len(batch["inputs"]))):
        inputs_S = batch["inputs"][r]
        if layout == "unified":
            objective = OBJECTIVES[int(batch["objective_ids"][r, 0])]
            # MLM rows predict in place; causal / prefix rows predict the next token.
            marked = batch["loss_mask"][r] > 0 if objective == "mlm" else np.zeros_like(inputs_S)
            originals = {int(t): int(batch["targets"][r, t]) for t in np.flatnonzero(marked)}
            row = {"objective": objective, "prefix_len": int(batch["prefix_len"][r, 0]),
                   "predicted": int((batch["loss_mask"][r] > 0).sum())}  # fmt: skip
        else:
            hits = batch["masked_weights"][r] > 0
            originals = dict(
                zip(batch["masked_positions"][r][hits].tolist(),
                    batch["masked_ids"][r][hits].tolist(), strict=True)
            )  # fmt: skip
            row = {"objective": "mlm", "predicted": len(originals)}
            if layout == "nsp":
                row["nsp"] = "random B" if batch["nsp_labels"][r, 0] else "next B"
        row["text"] = render_masked(tok, inputs_S[batch["segment_ids"][r] > 0], originals)
        out.append(row)
    return {"objective": layout, "rows": out}


def render_masked(tok, ids_S: np.ndarray, originals: dict[int, int]) -> str:
    """Decodes ``ids_S``, writing each position in ``originals`` as ``⟦original→input⟧``."""
    parts, run = [], []
    for t, i in enumerate(ids_S.tolist()):
        if t not in originals:
            run.append(i)
            continue
        parts.append(tok.decode(run))
        run = []
        was, now = tok.id_to_piece(originals[t]), tok.id_to_piece(i)
        lead = " " if was.startswith("▁") and was != "▁" else ""
        parts.append(f"{lead}⟦{_bare(was)}→{_bare(now)}⟧")
    parts.append(tok.decode(run))
    return "".join(parts)


def _bare(piece: str) -> str:
    """A piece without its word-start marker (a lone marker, a space, stays visible)."""
    return piece.lstrip("▁") or piece


def format_report(report: dict, width: int = 240) -> str:
    """The report as aligned text for a terminal; sample texts cut to ``width`` characters."""
    tok = report["tokenizer"]
    specials = " ".join(f"{k}={v}" for k, v in tok["special_ids"].items() if v is not None)
    lines = [
        f"cache      {report['cache_dir']} ({'reused' if report['cache_hit'] else 'built'})",
        f"tokenizer  {tok['source']}, vocab {tok['vocab_size']:,}; {specials}",
        f"batches    {report['batch_size']} x {report['seq_len']} tokens",
        "",
        f"{'source':<16}{'weight':>7}{'files':>7}{'MB':>9}{'docs tr/val':>16}"
        f"{'tokens train':>15}{'tokens val':>13}{'epochs/run':>12}",
    ]
    for s in report["sources"]:
        lines.append(
            f"{s['name']:<16}{s['weight']:>7.3f}{s['files']:>7}{s['bytes'] / 1e6:>9.2f}"
            f"{s['train_docs']:>9,}/{s['val_docs']:<6,}{s['train_tokens']:>15,}"
            f"{s['val_tokens']:>13,}{s['epochs_per_run']:>12.2f}"
        )
    sample = report["sample"]
    if sample["objective"] == "causal":
        lines += ["", f"batch of step {sample['step']} (causal LM; "
                  f"{BOUNDARY.strip()} = document boundary, where loss_mask is 0):"]  # fmt: skip
    else:
        lines += ["", f"batch of step {sample['step']} ({sample['objective']} layout; "
                  "⟦original→input⟧ = a predicted position):"]  # fmt: skip
    for i, row in enumerate(sample["rows"]):
        text = row["text"] if len(row["text"]) <= width else row["text"][:width] + "…"
        if "source" in row:
            what = f"{row['source']}, {row['documents']} doc(s)"
        else:
            what = ", ".join(
                [row["objective"]]
                + ([row["nsp"]] if "nsp" in row else [])
                + ([f"prefix {row['prefix_len']}"] if row["objective"] == "prefix_lm" else [])
            )
        lines.append(f"[{i}] {what}, {row['predicted']} predicted: {text!r}")
    return "\n".join(lines)
