"""One big text file is a corpus: under the default ``data.doc_split=none`` a corpus of one
document is cut into documents (blank lines, else lines, else fixed-size pieces), with one
line saying so; an explicit ``data.doc_split`` is used as given."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.data import prepare_data
from flaxlm.data.documents import Document, auto_split


@pytest.mark.parametrize(
    "text, expected",
    [
        ("To be.\nOr not.\n\nThat is\nthe question.\n", "blank_lines"),
        ("one line\nanother line\n", "lines"),
        ("\n\nonly one line here\n\n", "chars:11"),  # half of its 22 characters
        ("x" * 10_000, "chars:4096"),
    ],
)
def test_the_split_is_the_first_that_gives_two_pieces(text, expected):
    assert auto_split(Document("input.txt", text)) == expected


@pytest.fixture(scope="module")
def one_file(small_corpus, tmp_path_factory):
    """The six plays of the small corpus as one file (paragraphs between blank lines)."""
    out = tmp_path_factory.mktemp("one_file") / "input.txt"
    out.write_text("\n\n".join(p.read_text() for p in sorted(small_corpus.iterdir())))
    return out


def test_one_file_is_cut_at_blank_lines_and_says_so(one_file, tmp_path, capsys):
    cfg = load_config(
        REPO / "configs" / "gpt_tiny.yaml",
        [f"data.paths=[{one_file}]", f"data.cache_dir={tmp_path}"],
    )
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    said = [line for line in capsys.readouterr().out.splitlines() if "one document" in line]
    assert said == [
        f"data: one document ({one_file.name}); cut with data.doc_split=blank_lines "
        "(set data.doc_split to choose)"
    ]
    n_train, n_val = data.train.n_docs, data.val.n_docs
    paragraphs = [p for p in one_file.read_text().split("\n\n") if p.strip()]
    assert n_train > 100 and n_val > 10 and n_train + n_val <= len(paragraphs)


def test_an_explicit_split_is_used_as_given(one_file, tmp_path, capsys):
    cfg = load_config(
        REPO / "configs" / "gpt_tiny.yaml",
        [f"data.paths=[{one_file}]", f"data.cache_dir={tmp_path}", "data.doc_split=lines"],
    )
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    assert "one document" not in capsys.readouterr().out
    lines = [x for x in one_file.read_text().split("\n") if x.strip()]
    assert data.train.n_docs + data.val.n_docs == len(lines)


def test_flaxlm_train_takes_one_file_with_no_option(one_file, tiny_cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            str(REPO / "configs" / "gpt_tiny.yaml"),
            f"data.paths=[{one_file}]",
            f"data.cache_dir={tiny_cache_dir}",
            f"train.run_dir={run_dir}",
            "train.steps=4",
            "train.eval_every=0",
        ]
    )
    assert code == 0
    assert "cut with data.doc_split=blank_lines" in capsys.readouterr().out
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4]
