"""Training: the Lightning module, its callbacks, evaluation, loggers and one training run."""
