"""Depth: activation recomputation (remat) per block, and ``nn.scan`` over the blocks so that
XLA compiles one block whatever ``n_layers`` is (``model.remat``, ``model.scan_layers``)."""

from __future__ import annotations

import jax
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models.layers import Block

# The activations a block names (flaxlm/models/layers.py, ``checkpoint_name``) that its
# backward pass reads: the q/k/v projections' outputs, the attention's output (the out
# projection's input), the MLP's up and gate outputs (float32: the activation reads them so)
# and its hidden activation (the down projection's input). The out and down projections'
# outputs are only added to the residual stream, which the backward pass never reads back.
QKV_PROJ = ("query_proj", "key_proj", "value_proj")
ATTENTION = (*QKV_PROJ, "attention_out")
ALL_PROJ = (*ATTENTION, "mlp_up", "mlp_gate", "mlp_hidden")

# ``model.remat`` values that keep named activations: (names, offloaded to host memory).
# Kept activations are not recomputed in the backward pass; offloaded ones are copied to the
# host's pinned memory after the forward pass and back before the backward pass, so they cost
# no device memory in between (TPU and GPU; the CPU has only one memory, and refuses them).
NAMED_POLICIES: dict[str, tuple[tuple[str, ...], bool]] = {
    "save_qkv_proj": (QKV_PROJ, False),
    "save_attention": (ATTENTION, False),
    "save_all_proj": (ALL_PROJ, False),
    "offload_qkv_proj": (QKV_PROJ, True),
    "offload_all_proj": (ALL_PROJ, True),
}


def remat_policy(cfg: ModelConfig):
    """What a rematerialised block keeps from its forward pass: nothing ("full"), the matmul
    outputs without a batch dimension ("dots": weights-side products), or the named
    projection outputs of :data:`NAMED_POLICIES` (on the device, or offloaded to the host).
    Whatever is kept, the math is the same: the rest is recomputed from the block's input."""
    if cfg.remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if cfg.remat in NAMED_POLICIES:
        names, offload = NAMED_POLICIES[cfg.remat]
        if not offload:
            return jax.checkpoint_policies.save_only_these_names(*names)
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(names),
            offload_src="device",
            offload_dst="pinned_host",
        )
    return None


def remat_block(cfg: ModelConfig) -> type[nn.Module]:
    """``Block``, wrapped in ``nn.remat`` unless ``cfg.remat == "none"``."""
    if cfg.remat == "none":
        return Block
    # static_argnums counts ``self`` as 0: ``deterministic`` is argument 4.
    return nn.remat(Block, policy=remat_policy(cfg), static_argnums=(4,))


class _ScanStep(nn.Module):
    """One block in nn.scan's (carry, x) -> (carry, y) form."""

    cfg: ModelConfig
    norm_placement: str
    deterministic: bool
    causal: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, mask, positions_BxL, cache_index):
        moe = self.cfg.moe.num_experts > 0  # every block (moe.every > 1 cannot scan)
        block = Block(self.cfg, self.norm_placement, self.causal, moe, name="block")
        return block(x_BxLxD, mask, positions_BxL, self.deterministic, cache_index), None


class ScannedBlocks(nn.Module):
    """``n_layers`` blocks as one ``nn.scan``: parameters (and KV caches) are stacked along a
    leading axis named "layers", and XLA compiles a single block whatever the depth."""

    cfg: ModelConfig
    norm_placement: str
    deterministic: bool
    causal: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, mask, positions_BxL, cache_index=None):
        step = _ScanStep
        if self.cfg.remat != "none":
            step = nn.remat(_ScanStep, policy=remat_policy(self.cfg), prevent_cse=False)
        scan = nn.scan(
            step,
            variable_axes={"params": 0, "cache": 0, "moe": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        stack = scan(self.cfg, self.norm_placement, self.deterministic, self.causal, name="layers")
        x_BxLxD, _ = stack(x_BxLxD, mask, positions_BxL, cache_index)
        return x_BxLxD
