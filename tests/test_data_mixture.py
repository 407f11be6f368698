"""Weighted mixtures: config, per-source splits in one cache, shares, determinism, source ids."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxlm.config import ConfigError, DataConfig, SourceConfig, load_config
from flaxlm.data import (
    BATCH_KEYS,
    MIXTURE_BATCH_KEYS,
    CausalBatches,
    MixtureBatches,
    SourceData,
    TokenSplit,
    make_train_batches,
    prepare_data,
)
from flaxlm.data.mixture import apportion

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = (0.6, 0.3, 0.1)


def make_source(name: str, weight: float, n_tokens: int, base: int) -> SourceData:
    """A source whose token t of the stream is base + t, so rows reveal where they came from."""
    tokens = np.arange(base, base + n_tokens, dtype=np.uint32)
    offsets = np.array([0, n_tokens // 3, n_tokens], dtype=np.int64)
    return SourceData(name, weight, TokenSplit("train", tokens, offsets), None)


def three_sources() -> list[SourceData]:
    return [
        make_source("web", WEIGHTS[0], 40_000, 0),
        make_source("books", WEIGHTS[1], 3_000, 100_000),
        make_source("code", WEIGHTS[2], 500, 200_000),  # small: repeated many epochs
    ]


def test_shares_match_weights_over_2000_steps():
    batches = MixtureBatches(three_sources(), seq_len=8, global_batch=8, seed=3)
    counts = np.zeros(3)
    for k in range(2000):
        counts += np.bincount(batches.batch(k)["source_ids"][:, 0], minlength=3)
    shares = counts / counts.sum()
    assert np.abs(shares - np.array(WEIGHTS)).max() < 0.02
    assert np.abs(shares - np.array(WEIGHTS)).max() < 0.002  # in fact exact to one block
    # Every step's composition varies, but it is a function of (seed, step) alone.
    per_step = [
        tuple(np.bincount(batches.batch(k)["source_ids"][:, 0], minlength=3)) for k in range(50)
    ]
    assert len(set(per_step)) > 1


def test_rows_come_from_their_source_and_carry_its_id():
    sources = three_sources()
    batch = MixtureBatches(sources, seq_len=8, global_batch=16, seed=0).batch(7)
    assert set(batch) == set(MIXTURE_BATCH_KEYS)
    assert (
        batch["source_ids"].shape == batch["inputs"].shape and batch["source_ids"].dtype == np.int32
    )
    for row in range(16):
        s = batch["source_ids"][row, 0]
        assert (batch["source_ids"][row] == s).all()
        tokens = sources[s].train.tokens
        assert tokens[0] <= batch["inputs"][row, 0] <= tokens[-1]
        assert (np.diff(batch["inputs"][row]) == 1).all()  # a contiguous window of the stream


def test_each_source_walks_its_own_epochs_without_repeats():
    sources = three_sources()
    batches = MixtureBatches(sources, seq_len=8, global_batch=8, seed=1)
    code = batches.per_source[2]
    seen = []
    for k in range(2000):
        b = batches.batch(k)
        rows = b["source_ids"][:, 0] == 2
        seen += ((b["inputs"][rows, 0] - 200_000) // 8).tolist()
    n = code.n_examples
    assert len(seen) > 3 * n
    for e in range(3):  # each full epoch of the small source is a permutation of its examples
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))


def test_process_slices_concatenate_to_the_global_batch():
    batches = MixtureBatches(three_sources(), seq_len=8, global_batch=8, seed=5)
    for step in (0, 511, 512, 1999):  # 512 steps of 8 rows = one block of 4096 rows
        whole = batches.batch(step)
        for processes in (2, 4):
            parts = [
                MixtureBatches(three_sources(), 8, 8, seed=5).batch(step, p, processes)
                for p in range(processes)
            ]
            for key in MIXTURE_BATCH_KEYS:
                assert np.array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def digest(batch) -> str:
    return hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()


def test_batches_are_identical_in_a_fresh_process():
    script = f"""
import sys; sys.path.insert(0, {str(REPO / "tests")!r})
from test_data_mixture import three_sources, digest
from flaxlm.data import MixtureBatches
b = MixtureBatches(three_sources(), 8, 8, seed=9)
print(" ".join(digest(b.batch(k, 1, 2)) for k in (0, 700, 1500)))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    here = MixtureBatches(three_sources(), 8, 8, seed=9)
    assert out.stdout.split() == [digest(here.batch(k, 1, 2)) for k in (0, 700, 1500)]


def test_seed_changes_the_composition_and_emit_source_ids_can_be_off():
    a = MixtureBatches(three_sources(), 8, 8, seed=0)
    b = MixtureBatches(three_sources(), 8, 8, seed=1)
    assert not np.array_equal(a.batch(0)["inputs"], b.batch(0)["inputs"])
    plain = MixtureBatches(three_sources(), 8, 8, seed=0, emit_source_ids=False).batch(0)
    assert set(plain) == set(BATCH_KEYS)
    assert np.array_equal(plain["inputs"], a.batch(0)["inputs"])


def test_apportion_is_exact_and_refuses_bad_weights():
    assert apportion([0.6, 0.3, 0.1], 10).tolist() == [6, 3, 1]
    assert apportion([1, 1, 1], 4).tolist() == [2, 1, 1]  # ties go to the lower index
    assert apportion([0.7, 0.2, 0.1], 4096).sum() == 4096
    with pytest.raises(ValueError, match="positive"):
        apportion([1.0, 0.0], 10)


def write_corpus(root: Path, name: str, n_docs: int, word: str) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps({"body": f"{word} {i} " + f"{word} " * (5 + i % 7)}) for i in range(n_docs)]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root / f"{name}.jsonl"


def test_mixture_config_prepares_one_cache_with_a_range_per_source(tmp_path):
    a = write_corpus(tmp_path / "a", "alpha", 40, "alpha")
    b = write_corpus(tmp_path / "b", "beta", 20, "beta")
    overrides = [
        f"data.sources=[{{path: {a}, weight: 3, field: body}}, "
        f"{{path: {b}, weight: 1, field: body}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.tokenizer_vocab_size=300",
        "data.val_fraction=0.2",
        "data.seq_len=16",
        "model.vocab_size=384",
    ]
    cfg = load_config(None, overrides)
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    assert [s.name for s in data.sources] == ["alpha", "beta"]
    assert [s.weight for s in data.sources] == [0.75, 0.25]
    for source, word in zip(data.sources, ("alpha", "beta"), strict=True):
        for split in (source.train, source.val):
            assert split.n_docs > 0
            assert all(i.startswith(f"{word}.jsonl:") for i in split.doc_ids())
            text = data.tokenizer.decode(split.tokens[: split.doc_offsets[1] - 1].tolist())
            assert text.startswith(word)
    assert sum(s.train.n_docs for s in data.sources) == data.train.n_docs
    assert sum(s.val.n_tokens for s in data.sources) == data.val.n_tokens

    batches = make_train_batches(data, 16, 8, seed=0)
    assert isinstance(batches, MixtureBatches) and batches.names == ["alpha", "beta"]
    # Re-weighting changes the draw, not the tokens: the cache is reused.
    reweighted = load_config(None, [o.replace("weight: 3", "weight: 1") for o in overrides])
    again = prepare_data(reweighted.data, progress=False)
    assert again.cache_hit and again.cache_dir == data.cache_dir
    assert [s.weight for s in again.sources] == [0.5, 0.5]


def test_paths_config_stays_one_source_with_causal_batches(tmp_path):
    a = write_corpus(tmp_path / "a", "alpha", 30, "alpha")
    cfg = DataConfig(
        paths=[str(a)], jsonl_field="body", cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=300,
    )  # fmt: skip
    data = prepare_data(cfg, progress=False)
    assert [s.name for s in data.sources] == ["data"] and data.sources[0].weight == 1.0
    assert data.sources[0].train.n_tokens == data.train.n_tokens
    assert type(make_train_batches(data, 16, 4, seed=0)) is CausalBatches


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.sources=[{path: README.md, wieght: 2}]",
            "unknown config key 'data.sources[0].wieght' (did you mean 'data.sources[0].weight'?)",
        ),
        ("data.sources=[{path: README.md, weight: -1}]", "data.sources[0].weight=-1.0 must be > 0"),
        ("data.sources=[README.md, README.md]", "data.sources[1] name 'README' is used twice"),
        ("data.sources=[{path: /no/such.jsonl}]", "path '/no/such.jsonl' does not exist"),
        ("data.sources=[{weight: 1}]", "data.sources[0].path is empty"),
        ("data.sources=[5]", "data.sources[0]=5 should be a mapping"),
    ],
)
def test_source_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_paths_and_sources_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="set data.paths or data.sources, not both"):
        load_config(None, ["data.paths=[README.md]", "data.sources=[README.md]"])


def test_sources_round_trip_through_the_resolved_config(tmp_path):
    from flaxlm.config import save_config, to_dict

    cfg = load_config(
        None, ["data.sources=[{path: README.md, weight: 2, name: readme}, tfds:wiki/en:1.0.0]"]
    )
    assert cfg.data.sources == [
        SourceConfig(path="README.md", weight=2.0, name="readme"),
        SourceConfig(path="tfds:wiki/en:1.0.0"),
    ]
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


# Stages (data.stages): weights that change at given data positions.

STAGES = [(700, [0.2, 0.3, 0.5]), (1500, [1.0, 0.0, 0.0])]  # (data position, weights)


def test_without_stages_the_rows_are_those_dealt_before_stages_existed():
    # The digest of these batches from the implementation before stages and ramps (commit
    # ad2f678): a run with one stage and no ramp resumes on the very same rows.
    b = MixtureBatches(three_sources(), 8, 8, seed=9)
    got = " ".join(digest(b.batch(k, p, 2)) for k in (0, 1, 511, 512, 700, 1500) for p in (0, 1))
    assert hashlib.sha256(got.encode()).hexdigest() == (
        "b1974468de855b5965ceedd61098399c47a816ba55bddd483504081596595436"
    )


def counts(batches: MixtureBatches, first: int, end: int) -> list[int]:
    return np.bincount(batches.row_sources(np.arange(first, end))[0], minlength=3).tolist()


@pytest.mark.parametrize("ramp", [None, [[0, 2], [100, 4], [300, 8]]])
def test_stage_shares_are_exact_per_block_on_both_sides_of_each_boundary(ramp):
    from flaxlm.data.batch_ramp import BatchRamp
    from flaxlm.data.mixture import apportion_some

    r = BatchRamp(ramp or [], 8)
    batches = MixtureBatches(three_sources(), 8, 8, seed=2, ramp=r, stages=STAGES)
    start1, start2 = r.offset(700), r.offset(1500)  # the stages' first global rows
    block0, block1 = batches.stages[0].block_rows, batches.stages[1].block_rows
    assert block0 == block1 == 4096 and start1 > block0
    # Stage 0: whole blocks of 4096 rows, then the block the boundary cuts, exact too.
    w0, w1 = batches.stages[0].weights, batches.stages[1].weights  # normalised
    assert np.allclose(w0, WEIGHTS) and np.allclose(w1, STAGES[0][1])
    assert counts(batches, 0, block0) == apportion(w0, block0).tolist()
    assert counts(batches, block0, start1) == apportion(w0, start1 - block0).tolist()
    # Stage 1 deals its own blocks from its first row.
    assert counts(batches, start1, start1 + block1) == apportion(w1, block1).tolist()
    tail = start2 - start1 - block1
    want = apportion_some(w1, tail) if tail < block1 else apportion(w1, block1)
    assert counts(batches, start1 + block1, start1 + block1 + min(tail, block1)) == want.tolist()
    # Stage 2 leaves books and code out.
    assert counts(batches, start2, start2 + 3000) == [3000, 0, 0]
    # The batches of a data position are the rows the ramp gives it.
    sources = batches.batch(699)["source_ids"][:, 0]
    assert len(sources) == r.size(699)
    assert sources.tolist() == batches.row_sources(r.global_rows(699))[0].tolist()


def test_each_source_row_counter_continues_across_stages():
    batches = MixtureBatches(three_sources(), 8, 8, seed=2, stages=STAGES)
    source, within = batches.row_sources(np.arange(0, 1600 * 8))
    for s in range(3):
        # The j-th row a source ever gets is its row j: no gap, no repeat at a boundary.
        assert sorted(within[source == s].tolist()) == list(range(int((source == s).sum())))
        # ... and in row order, so its epochs are walked as without stages.
        assert (np.diff(within[source == s]) > 0).all()
    # A jump to any step needs nothing before it: a fresh object builds the same batch.
    for step in (699, 700, 1499, 1500, 1550):
        fresh = MixtureBatches(three_sources(), 8, 8, seed=2, stages=STAGES)
        halves = [fresh.batch(step, p, 2)["inputs"] for p in (0, 1)]
        assert np.array_equal(np.concatenate(halves), batches.batch(step)["inputs"])
    # The source counts before a boundary are the stages' closed form.
    assert batches.stages[1].before.tolist() == counts(batches, 0, 700 * 8)
    assert batches.stages[2].before.tolist() == counts(batches, 0, 1500 * 8)
    assert batches.rows_before(1500).tolist() == counts(batches, 0, 1500 * 8)  # data inspect


def test_stages_are_named_by_source_in_config_and_checked(tmp_path):
    from flaxlm.config import StageConfig

    base = "data.sources=[{path: README.md, name: web}, {path: pyproject.toml, name: books}]"
    cfg = load_config(None, [base, "data.stages=[{step: 800, weights: {books: 0.7, web: 0.3}}]"])
    assert cfg.data.stages == [StageConfig(step=800, weights={"books": 0.7, "web": 0.3})]
    bad = {
        "data.stages=[{step: 8, weights: {book: 1}}]": "data.stages[0].weights names 'book', "
        "not one of web, books",
        "data.stages=[{step: 8, weights: {web: 1}}, {step: 8, weights: {books: 1}}]": (
            "data.stages[1].step=8 must be > 8"
        ),
        "data.stages=[{step: 0, weights: {web: 1}}]": "data.stages[0].step=0 must be > 0",
        "data.stages=[{step: 5, weights: {web: 0}}]": "data.stages[0].weights={'web': 0.0} must",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [base, override])
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.stages needs a mixture"):
        load_config(None, ["data.paths=[README.md]", "data.stages=[{step: 5, weights: {a: 1}}]"])
