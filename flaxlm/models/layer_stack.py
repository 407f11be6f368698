"""Depth: activation recomputation (remat) per block, and ``nn.scan`` over the blocks so that
XLA compiles one block whatever ``n_layers`` is (``model.remat``, ``model.scan_layers``)."""

from __future__ import annotations

import jax
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models.layers import Block


def remat_policy(cfg: ModelConfig):
    """What a rematerialised block keeps from its forward pass: nothing ("full"), or the
    matmul outputs without a batch dimension ("dots": weights-side products)."""
    if cfg.remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
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
