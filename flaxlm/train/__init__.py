"""Training: state, jitted steps and the loop."""

from flaxlm.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
