"""Tools that work on checkpoints: load, evaluate, sample."""
