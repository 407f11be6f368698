"""The platform a step is being compiled for, and what ``auto`` choices mean on it.

The platform is that of the mesh in scope (``jax.set_mesh``: the train and eval steps trace
under it, and ``flaxlm plan --target v5e:8x8`` traces under a mesh of abstract TPU devices on
a CPU-only machine), else the default backend. So one config compiles the right kernels for
whatever it is compiled for, without a per-platform copy of the config.
"""

from __future__ import annotations

import jax

# model.attention_impl: auto, per platform (flaxlm/models/attention.py)
AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla"}


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
