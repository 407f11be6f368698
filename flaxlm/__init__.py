"""flaxlm: JAX/Flax pretraining for GPT- and BERT-style transformers (README.md).

Importing it before jax makes jax skip accelerator plugins (libtpu) that have no device to
drive on this machine: see flaxlm/runtime/accelerators.py.
"""

import sys

from flaxlm.runtime.accelerators import prefer_cpu_without_accelerators

if "jax" not in sys.modules:  # after that, jax has read JAX_PLATFORMS
    prefer_cpu_without_accelerators()
