"""A run's checkpoints hold the state *and* where the run is: data position, the guard's
state, the metrics.jsonl lines that belong to it."""

from __future__ import annotations

import jax
import numpy as np
from conftest import tiny_config

from flaxlm.families import family_of
from flaxlm.train.program import TrainProgram
from flaxlm.train.run_checkpoints import RunCheckpoints


def test_resume_or_start_save_and_restore(small_corpus, tiny_cache_dir, tmp_path):
    cfg = tiny_config(small_corpus, tiny_cache_dir, tmp_path, "checkpoint.asynchronous=false")
    ms = TrainProgram.build(cfg, family_of(cfg))
    ckpts = RunCheckpoints(cfg, ms, b"tokenizer bytes")
    start = ckpts.resume_or_start()
    assert (start.step, start.data_index, start.resumed_from) == (0, 0, None)

    state = start.state.replace(step=start.state.step + 7)
    start.healing.ledger.add(3, 4)  # as after a rollback
    ckpts.save(state, 7, 9, start.healing, metrics_lines=3)
    ckpts.close()

    again = RunCheckpoints(cfg, ms, b"tokenizer bytes").resume_or_start(announce=True)
    assert (again.step, again.data_index, again.resumed_from) == (7, 9, 7)
    assert again.metrics_lines == 3
    assert again.healing.ledger.windows == [(3, 4)]
    assert again.healing.next_data_index(3) == 5
    assert 7 in again.healing.policy.candidates  # saved, not yet known good
    for got, want in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(state.params),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
