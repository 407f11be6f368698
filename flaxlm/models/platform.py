"""The platform a step is being compiled for, and what ``auto`` choices mean on it.

The platform is that of the mesh in scope (``jax.set_mesh``: the train and eval steps trace
under it, and ``flaxlm plan --target v5e:8x8`` traces under a mesh of abstract TPU devices on
a CPU-only machine), else the default backend. So one config compiles the right kernels for
whatever it is compiled for, without a per-platform copy of the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

# model.attention_impl: auto, per platform (flaxlm/models/attention.py). On NVIDIA GPUs the
# Pallas (Triton) flash kernel with segment ids first; where it cannot tile the shape, cuDNN
# where cuDNN's fused attention takes the case (:func:`cudnn_supports`), else XLA.
AUTO_ATTENTION = {"tpu": "splash", "gpu": "triton", "cuda": "triton", "rocm": "xla"}
# cuDNN fused attention (jax.nn.dot_product_attention(implementation="cudnn")): fp16 / bf16
# only; head dims a multiple of 8 up to 128 (256 on Hopper and later, which a deviceless
# compile cannot see, so 128 here).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def current_platform() -> str:
    """``tpu``, ``gpu``, ``cpu``...: the platform of the mesh in scope, else JAX's default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return str(device.platform)
    return jax.default_backend()


def auto_attention(platform: str | None = None) -> str:
    """What ``model.attention_impl: auto`` runs on ``platform`` (default: the current one)."""
    return AUTO_ATTENTION.get(platform or current_platform(), "flaxlm")


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes inputs of ``dtype`` with heads of ``head_dim``."""
    return str(jnp.dtype(dtype)) in CUDNN_DTYPES and (
        head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    )


def kernel_specs(kernel: str, kv_heads: int, mesh) -> tuple[PartitionSpec, PartitionSpec]:
    """Shard specs of ``B x L x H x K`` and ``B x L`` for a per-device attention ``kernel``
    (splash, GPU flash) run under ``shard_map``: rows and heads as the logical rules place
    activations, the sequence and head dim whole (the kernels need whole sequences)."""
    batch, _, heads, _ = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", "act_kv"))
    if heads is not None:
        names = heads if isinstance(heads, tuple) else (heads,)
        shards = 1
        for name in names:
            shards *= mesh.shape[name]
        if kv_heads % shards:
            raise ValueError(
                f"{kernel}: {kv_heads} key/value heads cannot be split over the "
                f"{shards} devices of mesh axis {heads}; make model.n_kv_heads a multiple of it"
            )
    return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
