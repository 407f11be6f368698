"""Models: flax.linen modules with pure init/apply and logical axis names on every parameter."""

from flaxlm.models.bert import BERT
from flaxlm.models.gpt import GPT, count_params, non_embedding_params

__all__ = ["BERT", "GPT", "count_params", "non_embedding_params"]
