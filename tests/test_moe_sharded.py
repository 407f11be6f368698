"""Expert parallelism: an MoE GPT trained on 8 simulated devices, the experts split over the
``expert`` axis together with data and FSDP parallelism (2 x 2 x 2), gives the 1-device run's
losses, gradient norms, validation losses and final parameters (flaxlm/models/moe.py)."""

from __future__ import annotations

import pytest
from test_sharding import check_layouts_match_1_device

MOE = ("model.moe.num_experts=8", "model.moe.top_k=2")


@pytest.mark.slow
@pytest.mark.usefixtures("unoptimized_compiles")
def test_moe_expert_data_and_fsdp_parallel_match_1_device(small_corpus, tiny_cache_dir, tmp_path):
    overrides = ("train.steps=4", "train.eval_every=2", "checkpoint.every=2", *MOE)
    check_layouts_match_1_device(
        "gpt", small_corpus, tiny_cache_dir, tmp_path, overrides, meshes=("2,2,1,2",)
    )
