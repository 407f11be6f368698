"""Prepared corpora: `flaxlm data prepare` (parallel, resumable), `data.prepared` (the cache's
token streams, read shard by shard), `flaxlm data verify`, and per-host reads across two real
processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.config import ConfigError, load_config
from flaxlm.data import CausalBatches, prepare_data
from flaxlm.data import prepare as prepare_module
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.documents import DataError
from flaxlm.data.feistel import FeistelPermutation
from flaxlm.data.prepare import prepare_corpus
from flaxlm.data.prepared_reader import verify_prepared
from flaxlm.data.sharded_tokens import ShardedTokens
from flaxlm.families import family_of

WORKER = REPO / "tests" / "prepared_worker.py"


@pytest.fixture
def sources(small_corpus, tmp_path):
    """Two sources: six plays (a folder of .txt) and 60 short notes (one .jsonl)."""
    notes = tmp_path / "notes.jsonl"
    rng = np.random.default_rng(0)
    words = "to be or not the question whether tis nobler in mind suffer slings".split()
    with open(notes, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 40 + i)) + f" {i}"}) + "\n")
    return small_corpus, notes


def _config(sources, tmp_path, *overrides):
    plays, notes = sources
    return load_config(
        REPO / "configs" / "gpt_tiny.yaml",
        [
            f"data.sources=[{{path: {plays}, weight: 3, name: plays}}, "
            f"{{path: {notes}, weight: 1, name: notes}}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.2",
            *overrides,
        ],
    )


def _manifest_without_timing(manifest):
    return {k: v for k, v in manifest.items() if k not in ("seconds", "units_prepared")}


def test_a_prepared_corpus_holds_the_token_streams_of_the_cache(sources, tmp_path):
    cfg = _config(sources, tmp_path)
    manifest = prepare_corpus(cfg, tmp_path / "corpus", workers=2, progress=False)
    assert manifest["units_prepared"] == len(manifest["units"]) == 7  # 6 plays + 1 jsonl
    raw = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    pcfg = _config(sources, tmp_path, f"data.prepared={tmp_path / 'corpus'}")
    prepared = prepare_data(pcfg.data, pcfg.model.vocab_size)

    assert prepared.tokenizer.model_bytes == raw.tokenizer.model_bytes
    assert prepared.fingerprints == raw.fingerprints  # so a resume check compares alike
    for name in ("train", "val"):
        a, b = getattr(raw, name), getattr(prepared, name)
        assert isinstance(b.tokens, ShardedTokens) and b.order == "feistel"
        np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
        np.testing.assert_array_equal(b.doc_offsets, a.doc_offsets)
        assert b.doc_ids() == a.doc_ids()
        for predicted in (False, True):  # stored counts == counted from the tokens
            np.testing.assert_array_equal(
                b.unigram_counts(384, predicted), a.unigram_counts(384, predicted)
            )
    for src_raw, src in zip(raw.sources, prepared.sources, strict=True):
        assert (src.name, src.weight) == (src_raw.name, src_raw.weight)
        for name in ("train", "val"):
            a, b = getattr(src_raw, name), getattr(src, name)
            np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
            np.testing.assert_array_equal(b.doc_offsets, a.doc_offsets)

    # inspect reports the sources' files from the manifest (the raw text need not be here).
    from flaxlm.data.inspection import inspect_data

    report = inspect_data(pcfg, family_of(pcfg))
    assert [(r["name"], r["files"]) for r in report["sources"]] == [("plays", 6), ("notes", 1)]
    assert report["sources"][1]["bytes"] == sources[1].stat().st_size

    # data.sources may re-weight a prepared corpus, not rename its sources.
    heavier = _config(
        sources, tmp_path, f"data.prepared={tmp_path / 'corpus'}",
        "data.sources=[{path: x, weight: 1, name: plays}, {path: y, weight: 1, name: notes}]",
    )  # fmt: skip
    assert [s.weight for s in prepare_data(heavier.data).sources] == [0.5, 0.5]
    renamed = _config(
        sources, tmp_path, f"data.prepared={tmp_path / 'corpus'}",
        "data.sources=[{path: x, name: books}, {path: y, name: notes}]",
    )  # fmt: skip
    with pytest.raises(DataError, match=r"data.sources \['books', 'notes'\] do not match"):
        prepare_data(renamed.data)


def test_an_interrupted_prepare_resumes_with_the_units_it_had_not_finished(
    sources, tmp_path, monkeypatch
):
    cfg = _config(sources, tmp_path)
    out = tmp_path / "corpus"
    real = prepare_module.prepare_unit
    done = []

    def dies_on_the_third(cfg, out, unit, spec):
        if len(done) == 2:
            raise KeyboardInterrupt  # what a kill between units leaves
        done.append(unit.index)
        return real(cfg, out, unit, spec)

    monkeypatch.setattr(prepare_module, "prepare_unit", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg, out, workers=1, progress=False)
    assert not (out / "manifest.json").exists()
    (out / "units" / ".tmp-u000099-12345").mkdir()  # a half-written unit of a killed worker
    monkeypatch.setattr(prepare_module, "prepare_unit", real)

    resumed = prepare_corpus(cfg, out, workers=1, progress=False)
    assert resumed["units_prepared"] == len(resumed["units"]) - 2
    assert not list((out / "units").glob(".tmp-*"))
    fresh = prepare_corpus(cfg, tmp_path / "fresh", workers=1, progress=False)
    assert _manifest_without_timing(resumed) == _manifest_without_timing(fresh)
    # Complete: a rerun tokenizes nothing.
    assert prepare_corpus(cfg, out, workers=1, progress=False)["units_prepared"] == 0


def test_a_changed_source_file_redoes_its_unit_only_and_verify_sees_it(sources, tmp_path):
    cfg = _config(sources, tmp_path)
    out = tmp_path / "corpus"
    before = prepare_corpus(cfg, out, workers=1, progress=False)
    assert verify_prepared(out, progress=False) == []
    notes = sources[1]
    backup = notes.read_bytes()
    try:
        with open(notes, "a") as f:
            f.write(json.dumps({"text": "a late addition to the notes"}) + "\n")
        problems = verify_prepared(out, progress=False)
        assert problems == [f"{notes.resolve()}: the source changed since it was prepared"]
        after = prepare_corpus(cfg, out, workers=1, progress=False)
    finally:
        notes.write_bytes(backup)
    assert after["units_prepared"] == 1
    total = after["splits"]["train"]["n_docs"] + after["splits"]["val"]["n_docs"]
    assert total == before["splits"]["train"]["n_docs"] + before["splits"]["val"]["n_docs"] + 1


def test_damage_is_refused_at_start_and_named_by_verify(sources, tmp_path, capsys):
    cfg = _config(sources, tmp_path)
    out = tmp_path / "corpus"
    manifest = prepare_corpus(cfg, out, workers=1, progress=False)
    shard = out / manifest["units"][0]["folder"] / "train.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte: same size, so only the full check sees it
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"{shard}: SHA-256 differs from the manifest (corrupted)" in printed

    shard.write_bytes(bytes(data[:-10]))  # truncated: refused when training starts
    pcfg = _config(sources, tmp_path, f"data.prepared={out}")
    with pytest.raises(DataError, match=r"train.tokens.npy has \d+ bytes, expected \d+ \(\d+"):
        prepare_data(pcfg.data)
    (out / "manifest.json").write_text('{"format": 1, "units": [')  # cut short
    with pytest.raises(DataError, match=r"manifest.json is unreadable \(Expecting value"):
        prepare_data(pcfg.data)
    (out / "manifest.json").unlink()  # an unfinished prepare
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        _config(sources, tmp_path, f"data.prepared={out}")


def test_a_folder_of_other_settings_or_files_is_not_overwritten(sources, tmp_path):
    out = tmp_path / "corpus"
    prepare_corpus(_config(sources, tmp_path), out, workers=1, progress=False)
    other = _config(sources, tmp_path, "data.val_fraction=0.3")
    with pytest.raises(DataError, match="other settings .differing: val_fraction.;"):
        prepare_corpus(other, out, workers=1, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and holds no plan.json"):
        prepare_corpus(other, busy, workers=1, progress=False)
    assert (busy / "notes.txt").read_text() == "mine"


def test_feistel_order_is_a_permutation_per_epoch_and_a_function_of_seed_and_epoch():
    for n in (1, 2, 3, 17, 1000, 4097):
        perm = FeistelPermutation(n, (0, 5))(np.arange(n))
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    a, b = FeistelPermutation(1000, (0, 1)), FeistelPermutation(1000, (0, 2))
    assert (a(np.arange(1000)) != b(np.arange(1000))).mean() > 0.9
    np.testing.assert_array_equal(a(np.array([5, 999, 0])), a(np.arange(1000))[[5, 999, 0]])
    # Not near the identity: positions move all over the range.
    assert abs(np.corrcoef(np.arange(1000), a(np.arange(1000)))[0, 1]) < 0.1
    with pytest.raises(IndexError, match=r"indices must be in \[0, 1000\)"):
        a(np.array([1000]))


def test_sharded_tokens_read_like_one_array():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 500, 1000).astype(np.uint16)
    cuts = [0, 10, 10, 400, 999, 1000]  # an empty shard and a one-token shard
    tokens = ShardedTokens([whole[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    idx = rng.integers(-1000, 1000, (13, 17))
    np.testing.assert_array_equal(tokens[idx], whole[idx])
    view = tokens[395:1000]
    np.testing.assert_array_equal(np.asarray(view), whole[395:])
    np.testing.assert_array_equal(np.asarray(view[3:8]), whole[398:403])
    assert int(view[-1]) == int(whole[-1]) and len(view) == 605
    with pytest.raises(IndexError):
        view[np.array([605])]


def test_batches_of_a_prepared_corpus_cover_each_epoch_once(sources, tmp_path):
    plays_only = ("data.sources=[]", f"data.paths=[{sources[0]}]", "data.val_fraction=0.34")
    cfg = _config(sources, tmp_path, *plays_only)
    prepare_corpus(cfg, tmp_path / "corpus", workers=1, progress=False)
    pcfg = _config(sources, tmp_path, f"data.prepared={tmp_path / 'corpus'}", *plays_only)
    data = prepare_data(pcfg.data)
    batches = CausalBatches(data.train, seq_len=32, global_batch=8, seed=3)
    n = batches.n_examples
    ids = batches.example_ids(np.arange(2 * n))
    np.testing.assert_array_equal(np.sort(ids[:n]), np.arange(n))  # every example, once
    assert (ids[:n] != ids[n:]).mean() > 0.9  # the next epoch has another order
    assert (ids[:n] != np.arange(n)).mean() > 0.9  # shuffled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_only_their_rows_of_the_one_process_batch(sources, tmp_path):
    cfg = _config(sources, tmp_path)
    corpus = tmp_path / "corpus"
    prepare_corpus(cfg, corpus, workers=1, progress=False)
    overrides = [
        "data.sources=[{path: a, weight: 3, name: plays}, {path: b, weight: 1, name: notes}]",
        f"data.prepared={corpus}",
    ]
    port, env = _free_port(), {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(port),
                "2",
                str(i),
                str(tmp_path),
                str(REPO / "configs" / "gpt_tiny.yaml"),
                *overrides,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-3000:]

    one = load_config(REPO / "configs" / "gpt_tiny.yaml", overrides)
    data = prepare_data(one.data)
    batches = family_of(one).train_batches(data, one, BatchRamp.from_config(one.train))
    got = np.load(tmp_path / "global.npz")
    steps = [0, 1, 7, 1000]
    for step in steps:
        expect = batches.batch(step, 0, 1)
        assert {k.split("/")[1] for k in got.files} == set(expect)
        for key, value in expect.items():
            np.testing.assert_array_equal(got[f"{step}/{key}"], value, err_msg=f"{step}/{key}")
    # Each process read its half of the rows, the one process all of them.
    S, B = one.data.seq_len, one.train.batch_size
    assert data.train.tokens.reads.tokens == len(steps) * B * (S + 1)
    for i in range(2):
        reads = json.loads((tmp_path / f"reads-{i}.json").read_text())
        assert reads["tokens"] == len(steps) * (B // 2) * (S + 1), reads
    shutil.rmtree(corpus)


def test_a_run_trains_from_a_prepared_corpus_and_a_resume_may_not_switch_it(sources, tmp_path):
    from flaxlm.train import train
    from flaxlm.train.resume_checks import ResumeRefused

    plays = ("data.sources=[]", f"data.paths=[{sources[0]}]", "data.val_fraction=0.34")
    prepare_corpus(_config(sources, tmp_path, *plays), tmp_path / "corpus", progress=False)
    run = (f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "train.eval_every=4")
    cfg = _config(sources, tmp_path, *plays, *run, f"data.prepared={tmp_path / 'corpus'}")
    result = train(cfg)
    assert result.step == 4 and np.isfinite(result.history[-1]["loss"])
    assert np.isfinite(result.evals[-1]["val_loss"])
    raw = _config(sources, tmp_path, *plays, *run[:1], "train.steps=6")
    with pytest.raises(ResumeRefused, match="data.prepared"):
        train(raw)  # the raw cache orders examples differently: another run


def test_kill_9_mid_prepare_then_rerun_gives_the_fresh_corpus_and_one_prepare_per_folder(
    sources, tmp_path
):
    import fcntl
    import signal
    import time

    cfg = _config(sources, tmp_path)
    out = tmp_path / "corpus"
    plays, notes = sources
    cmd = [
        sys.executable, "-m", "flaxlm.cli", "data", "prepare",
        str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.sources=[{{path: {plays}, weight: 3, name: plays}}, "
        f"{{path: {notes}, weight: 1, name: notes}}]",
        f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
        "--out", str(out), "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("units/u*/unit.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers may finish their unit
    proc.wait()
    assert not (out / "manifest.json").exists() or proc.returncode == 0
    resumed = prepare_corpus(cfg, out, workers=1, progress=False)
    fresh = prepare_corpus(cfg, tmp_path / "fresh", workers=2, progress=False)
    assert _manifest_without_timing(resumed) == _manifest_without_timing(fresh)

    with open(out / ".prepare.lock", "w") as held:  # another prepare is running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere")
        held.flush()
        with pytest.raises(DataError, match=r"being prepared by another .* \(pid 4242 on elsewh"):
            prepare_corpus(cfg, out, workers=1, progress=False)


def test_a_full_disk_stops_prepare_with_one_line(sources, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "prepare_corpus", no_space)
    config = str(REPO / "configs" / "gpt_tiny.yaml")
    rc = main(["data", "prepare", config, f"data.paths=[{sources[1]}]", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "No space left on device; finished units are kept, rerun to continue" in err
