"""Learner: data-set import and the initial model (`flywheel init`), the mini-batch online
learner, its gate and elastic rate, and the holdout scorer the gate and the review page
share."""

from flywheel.learner.background import BackgroundConfig, BackgroundLine
from flywheel.learner.config import LearnerConfig
from flywheel.learner.cursor import CursorState
from flywheel.learner.elastic import ElasticRate
from flywheel.learner.evaluation import (
    UNKNOWN,
    Holdout,
    Score,
    accuracy,
    holdout_of,
    same_width,
    score,
)
from flywheel.learner.example_source import ExampleSource, StoredExample
from flywheel.learner.gate import GateResult, evaluate_gate
from flywheel.learner.init import (
    SPLIT_RULE,
    ChampionExists,
    InitConfig,
    InitError,
    InitOptions,
    InitResult,
    Meter,
    infer_file_schema,
    load_schema_file,
    run_init,
    write_demo_csv,
)
from flywheel.learner.lease import LeaseKeeper, StepAbandoned
from flywheel.learner.live import JUDGED_ROLES, LiveJudge, LiveVerdict, judge_counts
from flywheel.learner.online import Candidate, LearnerStats, OnlineLearner
from flywheel.learner.seed_model import default_spec, ensure_champion, train_seed_model
from flywheel.learner.trainer import OnlineTrainer, Reservoir, TrainerConfig, UpdateStats

__all__ = [
    "JUDGED_ROLES",
    "LiveJudge",
    "LiveVerdict",
    "judge_counts",
    "SPLIT_RULE",
    "UNKNOWN",
    "BackgroundConfig",
    "BackgroundLine",
    "Candidate",
    "ChampionExists",
    "CursorState",
    "ElasticRate",
    "ExampleSource",
    "GateResult",
    "Holdout",
    "InitConfig",
    "InitError",
    "InitOptions",
    "InitResult",
    "LearnerConfig",
    "LearnerStats",
    "LeaseKeeper",
    "Meter",
    "OnlineLearner",
    "OnlineTrainer",
    "Reservoir",
    "Score",
    "StepAbandoned",
    "StoredExample",
    "TrainerConfig",
    "UpdateStats",
    "accuracy",
    "default_spec",
    "ensure_champion",
    "evaluate_gate",
    "holdout_of",
    "infer_file_schema",
    "load_schema_file",
    "run_init",
    "same_width",
    "score",
    "train_seed_model",
    "write_demo_csv",
]
