"""``metrics.jsonl`` on an object store, where nothing can be appended to: the lines go into
segments ``RUN_DIR/metrics/<first line number>.jsonl``, each rewritten whole (one PUT) as it
grows, and read back merged: segment after segment while each starts where the one before
ended, so a segment left behind by a cut-short truncation is never read.

    log = SegmentedLog(run_dir)
    log.open(keep)            # keep(lines) -> the lines that belong to this attempt
    log.append(line); log.flush()
    segment_lines(run_dir)    # every line, in order: what ``flaxlm report`` reads

:class:`flaxlm.train.metrics_log.MetricsLog` uses it for a run dir on an object store; on a
local disk the file is appended to as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flaxlm import storage

SEGMENTS = "metrics"  # the folder of the segments, beside where metrics.jsonl would be
SEGMENT_LINES = 2000  # a new segment after this many lines: each PUT stays small
FLUSH_EVERY_S = 10.0  # the open segment is written at most this often (and at every flush)


def _segments(run_dir: str, name: str = SEGMENTS) -> list[tuple[int, str]]:
    """(first line number, URL) of every segment of the folder ``name``, in order."""
    folder = storage.join(run_dir, name)
    names = [n for n in storage.children(folder) if n.endswith(".jsonl") and n[:-6].isdigit()]
    return sorted((int(n[:-6]), storage.join(folder, n)) for n in names)


def segment_lines(run_dir: str, name: str = SEGMENTS) -> list[str]:
    """The lines of every segment (of the folder ``name``), merged; [] when there are none."""
    lines: list[str] = []
    for start, url in _segments(run_dir, name):
        if start != len(lines):
            break  # left behind by a truncation that was cut short
        lines += storage.read_text(url).splitlines()
    return lines


class SegmentedLog:
    """One line file of ``run_dir`` as segments in its folder ``name`` (``metrics``: the
    lines of metrics.jsonl; ``goodput``: those of goodput.jsonl)."""

    def __init__(self, run_dir: str, name: str = SEGMENTS):
        self.run_dir, self.name = run_dir, name
        self._start = 0  # line number of the open segment's first line
        self._open: list[str] = []  # the open segment's lines
        self._written_at = 0.0
        self._dirty = False

    def open(self, keep: Callable[[list[str]], list[str]]) -> int:
        """Keeps ``keep(lines)`` of what is there (a prefix); returns how many lines that is."""
        lines = segment_lines(self.run_dir, self.name)
        kept = keep(lines)
        # The segments past the kept lines go first, newest first, so that a kill midway
        # leaves a readable prefix; then the segment holding the cut is rewritten.
        segments = _segments(self.run_dir, self.name)
        for start, url in reversed(segments):
            if start >= len(kept):
                storage.delete(url)
        self._start = max([s for s, _ in segments if s < len(kept)], default=0)
        self._open = kept[self._start :]
        self._dirty = len(kept) != len(lines)
        self.flush()
        return len(kept)

    def append(self, line: str) -> None:
        self._open.append(line)
        self._dirty = True
        if len(self._open) >= SEGMENT_LINES:
            self.flush()
            self._start += len(self._open)
            self._open = []
        elif time.monotonic() - self._written_at >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Writes the open segment (whole), if it changed."""
        if not self._dirty:
            return
        url = storage.join(self.run_dir, self.name, f"{self._start:09d}.jsonl")
        storage.write_text(url, "".join(line + "\n" for line in self._open))
        self._written_at, self._dirty = time.monotonic(), False
