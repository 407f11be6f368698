"""Checkpoints: the Orbax manager with integrity checks and walk-back (manager.py) and the
files written beside the arrays (files.py: manifests, the tokenizer, the resolved config)."""
