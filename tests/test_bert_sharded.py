"""BERT trained on each mesh layout of 8 simulated devices equals the 1-device run."""

from __future__ import annotations

from test_sharding import check_layouts_match_1_device


def test_bert_on_every_layout_matches_1_device(small_corpus, tiny_cache_dir, tmp_path):
    overrides = ("train.steps=5", "train.eval_every=5", "checkpoint.every=5")
    check_layouts_match_1_device(
        "bert", small_corpus, tiny_cache_dir, tmp_path, overrides, ("mlm_loss", "nsp_loss")
    )
