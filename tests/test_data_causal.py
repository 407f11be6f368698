"""Packed causal examples and step-indexed batches: a pure function of (seed, step)."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxlm.data import BATCH_KEYS, CausalBatches, TokenSplit, pack_examples


def make_split(doc_lengths: list[int], seed: int = 0, unique: bool = False) -> TokenSplit:
    """A split with documents of the given lengths; unique=True makes token t equal to t."""
    n = sum(doc_lengths)
    rng = np.random.default_rng(seed)
    tokens = np.arange(n, dtype=np.uint32) if unique else rng.integers(7, 500, n).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return TokenSplit("train", tokens, offsets)


def reference_example(split: TokenSplit, i: int, S: int) -> dict[str, list]:
    """Plain-Python version of one packed example, for comparison."""
    starts = list(split.doc_offsets[:-1])

    def doc_of(t: int) -> int:
        return max(d for d, s in enumerate(starts) if s <= t)

    window = list(range(i * S, i * S + S + 1))
    out = {key: [] for key in BATCH_KEYS}
    segment, position = 1, 0
    for col, t in enumerate(window[:-1]):
        if col > 0 and doc_of(t) != doc_of(t - 1):
            segment, position = segment + 1, 0
        out["inputs"].append(int(split.tokens[t]))
        out["targets"].append(int(split.tokens[t + 1]))
        out["segment_ids"].append(segment)
        out["positions"].append(position)
        out["loss_mask"].append(1.0 if doc_of(t + 1) == doc_of(t) else 0.0)
        position += 1
    return out


def test_packing_matches_plain_python_reference():
    split = make_split([3, 5, 1, 7, 4, 1, 9, 2])
    S = 4
    n = (split.n_tokens - 1) // S
    packed = pack_examples(split.tokens, split.doc_offsets, np.arange(n), S)
    assert packed["inputs"].dtype == np.int32 and packed["loss_mask"].dtype == np.float32
    for key in BATCH_KEYS:
        assert packed[key].shape == (n, S)
    for i in range(n):
        ref = reference_example(split, i, S)
        for key in BATCH_KEYS:
            assert packed[key][i].tolist() == ref[key], (i, key)


def test_packing_by_hand():
    # Documents: [10 11 12] [13 14] [15 16 17 18]; S=4, example 0 = tokens 0..4.
    split = TokenSplit("t", np.arange(10, 19, dtype=np.uint16), np.array([0, 3, 5, 9]))
    ex = pack_examples(split.tokens, split.doc_offsets, np.array([0, 1]), 4)
    assert ex["inputs"].tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert ex["targets"].tolist() == [[11, 12, 13, 14], [15, 16, 17, 18]]
    assert ex["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 2, 2, 2]]
    assert ex["positions"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert ex["loss_mask"].tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]


def test_batch_k_is_the_same_in_fresh_objects_and_after_restart():
    split = make_split([50, 80, 30, 120, 70])
    a = CausalBatches(split, seq_len=8, global_batch=4, seed=7)
    b = CausalBatches(split, seq_len=8, global_batch=4, seed=7)
    for k in (0, 3, 17, 200):
        assert all(a.batch(k)[key].tobytes() == b.batch(k)[key].tobytes() for key in BATCH_KEYS)
    restarted = CausalBatches(split, seq_len=8, global_batch=4, seed=7)
    assert np.array_equal(restarted.batch(17)["inputs"], a.batch(17)["inputs"])
    assert not np.array_equal(a.batch(3)["inputs"], a.batch(4)["inputs"])
    other_seed = CausalBatches(split, seq_len=8, global_batch=4, seed=8)
    assert not np.array_equal(other_seed.batch(3)["inputs"], a.batch(3)["inputs"])


def test_call_order_does_not_matter():
    split = make_split([50, 80, 30, 120, 70])
    forward = CausalBatches(split, 8, 6, seed=1)
    shuffled = CausalBatches(split, 8, 6, seed=1)
    steps = [0, 1, 2, 40, 41, 90]
    expected = {k: forward.batch(k)["inputs"] for k in steps}
    for k in [90, 2, 41, 0, 90, 40, 1]:  # jumps across epochs, backwards, repeats
        assert np.array_equal(shuffled.batch(k)["inputs"], expected[k])


def test_batch_is_identical_in_a_fresh_process(tmp_path):
    split = make_split([50, 80, 30, 120, 70])
    np.save(tmp_path / "tokens.npy", split.tokens)
    np.save(tmp_path / "offsets.npy", split.doc_offsets)
    script = f"""
import hashlib, numpy as np
from pathlib import Path
from flaxlm.data import CausalBatches, TokenSplit
split = TokenSplit("t", np.load("{tmp_path}/tokens.npy", mmap_mode="r"),
                   np.load("{tmp_path}/offsets.npy"))
b = CausalBatches(split, 8, 4, seed=3).batch(123)
print(hashlib.sha256(b"".join(b[k].tobytes() for k in sorted(b))).hexdigest())
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    here = CausalBatches(split, 8, 4, seed=3).batch(123)
    digest = hashlib.sha256(b"".join(here[k].tobytes() for k in sorted(here))).hexdigest()
    assert out.stdout.strip() == digest


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_are_disjoint_and_concatenate_to_the_global_batch(processes):
    split = make_split([200, 300], unique=True)
    batches = CausalBatches(split, seq_len=8, global_batch=8, seed=0)
    for step in (0, 5):
        whole = batches.batch(step)
        parts = [batches.batch(step, p, processes) for p in range(processes)]
        for key in BATCH_KEYS:
            assert np.array_equal(np.concatenate([part[key] for part in parts]), whole[key])
        examples = [set(part["inputs"][:, 0] // 8) for part in parts]
        assert sum(map(len, examples)) == 8 and len(set.union(*examples)) == 8


def test_batch_not_divisible_by_processes():
    batches = CausalBatches(make_split([100]), 8, 6, seed=0)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by process_count=4"):
        batches.batch(0, 0, 4)


def test_each_epoch_covers_every_example_once_in_a_new_order():
    split = make_split([101, 60, 80], unique=True)  # 241 tokens: 60 examples of S=4
    batches = CausalBatches(split, seq_len=4, global_batch=6, seed=0)
    n = batches.n_examples
    assert n == (split.n_tokens - 1) // 4 and n % 6 == 0
    per_epoch = n // 6
    orders = []
    for epoch in range(3):
        firsts = [
            batches.batch(k)["inputs"][:, 0] // 4
            for k in range(epoch * per_epoch, (epoch + 1) * per_epoch)
        ]
        order = np.concatenate(firsts)
        assert sorted(order.tolist()) == list(range(n))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_batches_straddling_epochs_follow_the_global_index():
    split = make_split([45], unique=True)  # 11 examples of S=4
    batches = CausalBatches(split, seq_len=4, global_batch=4, seed=2)
    ids = np.concatenate([batches.batch(k)["inputs"][:, 0] // 4 for k in range(11)])  # 4 epochs
    for e in range(4):
        assert np.array_equal(ids[e * 11 : (e + 1) * 11], batches.permutation(e))


def test_unshuffled_batches_are_sequential():
    split = make_split([100], unique=True)
    batches = CausalBatches(split, seq_len=4, global_batch=3, seed=0, shuffle=False)
    assert (batches.batch(2)["inputs"][:, 0] // 4).tolist() == [6, 7, 8]


def test_eval_batches_pad_the_last_batch_with_masked_rows():
    split = make_split([30, 13], unique=True)  # 42 // 4 = 10 examples
    batches = CausalBatches(split, seq_len=4, global_batch=8, seed=0)
    evals = list(batches.eval_batches(batch_size=4))
    assert len(evals) == 3 and all(b["inputs"].shape == (4, 4) for b in evals)
    last = evals[-1]
    assert last["loss_mask"][2:].sum() == 0 and last["segment_ids"][2:].sum() == 0
    firsts = np.concatenate([b["inputs"][:, 0] for b in evals])[:10] // 4
    assert firsts.tolist() == list(range(10))
    assert len(list(batches.eval_batches(batch_size=4, max_batches=2))) == 2
    halves = list(batches.eval_batches(4, process_index=1, process_count=2))
    assert np.array_equal(halves[0]["inputs"], evals[0]["inputs"][2:])


def test_split_too_short_for_one_example():
    with pytest.raises(ValueError, match="seq_len=16 \\(needs 17\\)"):
        CausalBatches(make_split([10]), seq_len=16, global_batch=2, seed=0)
