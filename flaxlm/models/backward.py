"""The one switch for every hand-written backward pass: ``model.custom_backward``.

Five places have a closed-form backward (a ``jax.custom_vjp``): the matmul (matmul.py),
softmax attention (attention.py), LayerNorm and the tanh GELU (norm_act.py), and the chunked
LM head + loss (flaxlm/losses/head_loss.py). Each exists because XLA:CPU's autodiff of that op is
slow (benchmarks/RESULTS.md); none was measured on a GPU or TPU, where XLA fuses the
element-wise passes itself. So ``auto`` (the default) turns them on only when jax runs on
the CPU; ``off`` runs the same forward as ordinary jnp code and lets autodiff take the
gradient; ``on`` forces the hand-written ones everywhere. Both give the same values and
gradients (tests/test_matmul.py, test_attention.py, test_norm_act.py, test_head_loss.py).
"""

from __future__ import annotations

from flaxlm.config import CHOICES, Config, ModelConfig
from flaxlm.models.platform import current_platform

MODES = CHOICES["model.custom_backward"]


def use_custom_backward(cfg: Config | ModelConfig | str = "auto") -> bool:
    """Whether the hand-written backward passes run, for a config (its
    ``model.custom_backward``) or a mode: ``on``, ``off``, or ``auto`` = only when
    when the step is compiled for the CPU (flaxlm/models/platform.py)."""
    mode = cfg if isinstance(cfg, str) else getattr(cfg, "model", cfg).custom_backward
    if mode not in MODES:
        raise ValueError(f"model.custom_backward={mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return current_platform() == "cpu"
    return mode == "on"


def resolve(custom_backward: bool | None) -> bool:
    """A function's ``custom_backward`` argument: None (not given) = the ``auto`` choice."""
    return use_custom_backward("auto") if custom_backward is None else bool(custom_backward)
