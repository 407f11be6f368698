"""Sources: which files are documents, their ids, and the errors for unusable input."""

import json

import pytest

from flaxlm.data import DataError, SourceStats, iter_documents


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "play.txt").write_text("Enter Ghost.\n\nExit Ghost.\n")
    docs = list(iter_documents([str(tmp_path / "play.txt")], "text"))
    assert [(d.doc_id, d.text) for d in docs] == [("play.txt", "Enter Ghost.\n\nExit Ghost.\n")]


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("z")
    (tmp_path / "b" / "a.txt").write_text("a")
    (tmp_path / "c.txt").write_text("c")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": "d1"}) + "\n" + json.dumps({"text": "d2"})
    )
    docs = list(iter_documents([str(tmp_path)], "text"))
    assert [d.doc_id for d in docs] == ["b/a.txt", "b/z.md", "c.txt", "d.jsonl:1", "d.jsonl:2"]
    assert [d.text for d in docs] == ["a", "z", "c", "d1", "d2"]


def test_jsonl_lines_are_documents_and_empty_ones_are_counted(tmp_path):
    lines = [{"body": "first"}, {"body": "   \n"}, {"body": "third", "id": 3}, {"body": ""}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    stats = SourceStats()
    docs = list(iter_documents([str(path)], "body", stats))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("docs.jsonl:1", "first"),
        ("docs.jsonl:3", "third"),
    ]
    assert (stats.n_docs, stats.n_empty) == (2, 2)


def test_empty_files_are_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "full.txt").write_text("words")
    stats = SourceStats()
    assert [d.doc_id for d in iter_documents([str(tmp_path)], "text", stats)] == ["full.txt"]
    assert stats.n_empty == 2


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at byte offset 3"):
        list(iter_documents([str(path)], "text"))


def test_missing_jsonl_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no field 'text' \(found: content\)"):
        list(iter_documents([str(path)], "text"))


def test_bad_jsonl_values(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:1: field 'text' is int"):
        list(iter_documents([str(path)], "text"))
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: invalid JSON"):
        list(iter_documents([str(path)], "text"))


def test_empty_source_names_the_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n\n")
    paths = [str(tmp_path / "empty"), str(tmp_path / "blank.txt")]
    with pytest.raises(DataError, match="hold no non-empty documents") as err:
        list(iter_documents(paths, "text"))
    assert str(tmp_path / "empty") in str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        list(iter_documents([str(tmp_path / "nope.txt")], "text"))
