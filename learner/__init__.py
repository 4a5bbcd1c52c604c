"""Learner: model training and publishing to the registry."""

from flywheel.learner.seed_model import default_spec, ensure_champion, seed_data, train_seed_model

__all__ = ["default_spec", "ensure_champion", "seed_data", "train_seed_model"]
