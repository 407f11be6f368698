"""Losses: causal LM, MLM and NSP objectives with their metrics (objectives.py), and the LM
head + loss computed over chunks so the logits are never stored whole (head_loss.py)."""
