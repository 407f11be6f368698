"""BERT trained on mesh layouts of 8 simulated devices equals the 1-device run.

GPT runs on all four layouts (tests/test_sharding.py); BERT shares the step and the rules
table, so it runs on the two that exercise its own parameters' shardings: FSDP x tensor (the
vocabulary, heads, MLP and pooler split) and data x FSDP x tensor at once.
"""

from __future__ import annotations

from test_sharding import check_layouts_match_1_device


def test_bert_on_the_fsdp_and_tensor_layouts_matches_1_device(
    small_corpus, tiny_cache_dir, tmp_path
):
    overrides = ("train.steps=5", "train.eval_every=5", "checkpoint.every=5")
    check_layouts_match_1_device(
        "bert", small_corpus, tiny_cache_dir, tmp_path, overrides, ("mlm_loss", "nsp_loss"),
        meshes=("1,4,2", "2,2,2"),
    )  # fmt: skip
