"""BERT trained on mesh layouts of 8 simulated devices equals the 1-device run.

GPT runs on several layouts (tests/test_sharding.py); BERT shares the step and the rules
table, so it runs on the one that exercises all its own parameters' shardings at once:
data x FSDP x tensor (the vocabulary, heads, MLP and pooler split; the batch over data and
FSDP). Suite time keeps it to that one.
"""

from __future__ import annotations

import pytest
from test_sharding import check_layouts_match_1_device


@pytest.mark.slow
@pytest.mark.usefixtures("unoptimized_compiles")
def test_bert_on_data_fsdp_and_tensor_at_once_matches_1_device(
    small_corpus, tiny_cache_dir, tmp_path
):
    overrides = ("train.steps=5", "train.eval_every=5", "checkpoint.every=5")
    check_layouts_match_1_device(
        "bert", small_corpus, tiny_cache_dir, tmp_path, overrides, ("mlm_loss", "nsp_loss"),
        meshes=("2,2,2",),
    )  # fmt: skip
