"""`flaxlm data inspect`: source sizes, counts, cache, tokenizer and a decoded sample batch."""

import dataclasses
import json

import numpy as np

from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.data import prepare_data
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.inspection import inspect_data
from flaxlm.families import family_of


def write_sources(tmp_path):
    (tmp_path / "plays").mkdir()
    for i in range(5):
        (tmp_path / "plays" / f"p{i}.txt").write_text(
            f"ACT {i}\nEnter the ghost of play {i}.\n" * 8
        )
    lines = [json.dumps({"body": f"note {i}: a short line of notes"}) for i in range(30)]
    (tmp_path / "notes.jsonl").write_text("\n".join(lines) + "\n")


def overrides(tmp_path):
    return [
        f"data.sources=[{{path: {tmp_path / 'plays'}, weight: 0.75}}, "
        f"{{path: {tmp_path / 'notes.jsonl'}, weight: 0.25, field: body}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.tokenizer_vocab_size=300",
        "data.val_fraction=0.2",
    ]


def test_inspect_json_reports_each_source_and_a_sample(tmp_path, capsys):
    write_sources(tmp_path)
    args = ["data", "inspect", "configs/gpt_tiny.yaml", *overrides(tmp_path), "--json"]
    assert main([*args, "--rows", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cache_dir"].startswith(str(tmp_path / "cache")) and not report["cache_hit"]
    assert report["tokenizer"]["special_ids"] == {
        "pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4, "sep": 5, "mask": 6,
    }  # fmt: skip
    plays, notes = report["sources"]
    assert (plays["name"], plays["files"], notes["name"], notes["files"]) == (
        "plays", 5, "notes", 1,
    )  # fmt: skip
    assert plays["train_docs"] + plays["val_docs"] == 5
    assert notes["train_docs"] + notes["val_docs"] == 30
    assert notes["bytes"] == (tmp_path / "notes.jsonl").stat().st_size
    assert plays["train_tokens"] > 0 and plays["weight"] == 0.75
    sample = report["sample"]
    assert sample["objective"] == "causal" and len(sample["rows"]) == 8
    assert {row["source"] for row in sample["rows"]} <= {"plays", "notes"}
    assert any("note" in row["text"] for row in sample["rows"] if row["source"] == "notes")
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["cache_hit"]


def test_inspect_text_is_a_readable_table(tmp_path, capsys):
    write_sources(tmp_path)
    assert main(["data", "inspect", "configs/gpt_tiny.yaml", *overrides(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer" in out and "epochs/run" in out and "batch of step 0" in out
    assert out.count("\n[") == 2  # two sample rows by default
    lines = out.splitlines()
    assert any(line.startswith("plays") for line in lines)
    assert any(line.startswith("notes") for line in lines)


def test_inspect_errors_are_one_line(tmp_path, capsys):
    rc = main(["data", "inspect", "configs/gpt_tiny.yaml", "data.sources=[{path: /no/such}]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.sources[0].path '/no/such' does not exist" in err and err.count("\n") == 1


def test_tokenizer_train_cli_options(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "雪 が 降る 雪 雪 降る"}) + "\n")
    rc = main(
        ["tokenizer", "train", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "tok"),
         "--vocab-size", "300", "--type", "unigram", "--field", "body",
         "--character-coverage", "0.9995", "--normalization", "nfkc"]
    )  # fmt: skip
    assert rc == 0 and (tmp_path / "tok.model").is_file()


def test_inspect_bert_marks_every_predicted_position(tmp_path, capsys):
    write_sources(tmp_path)
    one_source = [f"data.paths=[{tmp_path / 'plays'}]", *overrides(tmp_path)[1:]]
    args = ["data", "inspect", "configs/bert_tiny.yaml", *one_source, "--json"]
    assert main([*args, "--rows", "6"]) == 0
    sample = json.loads(capsys.readouterr().out)["sample"]
    assert sample["objective"] == "nsp" and len(sample["rows"]) == 6
    marks = []
    for row in sample["rows"]:
        assert row["nsp"] in ("next B", "random B")
        assert row["text"].count("⟦") == row["predicted"] > 0
        marks += [m.split("⟧")[0] for m in row["text"].split("⟦")[1:]]
    # Most predicted positions show [MASK] as input; the original is always a real piece.
    shown = [m.split("→")[1] for m in marks]
    assert shown.count("[MASK]") > len(marks) / 2
    assert all(m.split("→")[0] not in ("", "[MASK]", "[CLS]", "[SEP]") for m in marks)

    unified = [*args[:-1], "objective.causal=1", "objective.mlm=1", "objective.nsp=false"]
    assert main([*unified, "--rows", "8"]) == 0
    out = capsys.readouterr().out
    assert "unified layout" in out and "⟦" in out
    assert "causal," in out and "mlm," in out


def test_inspect_shows_the_batch_the_family_makes_for_the_step(tmp_path):
    """The sample decodes exactly the batch training gets at that step: the family's own batch
    maker with the run's batch ramp (and, for the GPT mixture, its stages)."""
    write_sources(tmp_path)
    one_source = [f"data.paths=[{tmp_path / 'plays'}]", *overrides(tmp_path)[1:]]
    ramp = "train.batch_ramp=[[0, 2], [3, 8]]"  # 2 rows at steps 0..2, then 8
    gpt = load_config("configs/gpt_tiny.yaml", [*overrides(tmp_path), ramp,
                      "data.stages=[{step: 2, weights: {notes: 1}}]"])  # fmt: skip
    bert = load_config("configs/bert_tiny.yaml", [*one_source, ramp])
    for cfg in (gpt, bert):
        family = family_of(cfg)
        prepared = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
        batches = family.train_batches(prepared, cfg, BatchRamp.from_config(cfg.train))
        seen: list[dict] = []

        def sample(cfg, prepared, batch, rows, real=family.inspect_sample, seen=seen):
            seen.append(batch)
            return real(cfg, prepared, batch, rows)

        watched = dataclasses.replace(family, inspect_sample=sample)
        for step in (1, 3):
            report = inspect_data(cfg, watched, step, rows=8)
            want = batches.batch(step)
            got = seen.pop()
            assert set(got) == set(want), cfg.model.family
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
            assert report["sample"] == {
                "step": step,
                **family.inspect_sample(cfg, prepared, want, 8),
            }
            assert len(report["sample"]["rows"]) == (2 if step == 1 else 8)
