"""Learner: the initial model, the mini-batch online learner, its gate and elastic rate."""

from flywheel.learner.cursor import CursorState
from flywheel.learner.elastic import ElasticRate
from flywheel.learner.gate import GateResult, Holdout, evaluate_gate
from flywheel.learner.online import Candidate, LearnerStats, OnlineLearner
from flywheel.learner.seed_model import default_spec, ensure_champion, train_seed_model
from flywheel.learner.trainer import OnlineTrainer, Reservoir, TrainerConfig, UpdateStats

__all__ = [
    "Candidate", "CursorState", "ElasticRate", "GateResult", "Holdout", "LearnerStats",
    "OnlineLearner", "OnlineTrainer", "Reservoir", "TrainerConfig", "UpdateStats",
    "default_spec", "ensure_champion", "evaluate_gate",
    "train_seed_model",
]
