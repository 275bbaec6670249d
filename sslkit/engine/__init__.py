"""Training loop, DeepSpeed set-up, checkpoints and schedules. Heavy imports stay inside functions."""
