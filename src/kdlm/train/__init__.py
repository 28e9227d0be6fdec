"""Training: the accelerate loop, objectives, checkpoints."""
