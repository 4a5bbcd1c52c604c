"""The demo: the whole loop on embedded defaults, driven by a simulated production app.

* `files`: the trusted CSV `init` imports and the live stream CSV the app reads;
* `loop`: the stack (broker, store, service, feedback worker, learner) started in one
  process, the simulated app, and what is measured from outside;
* `report`: what `flywheel demo --report DIR` writes (accuracy.png, summary.md/json);
* `fed_report`: what `flywheel fed demo --report DIR` writes beside its summary.json
  (accuracy.png per round, summary.md), from `report`'s pieces;
* `datasets`: real labelled data sets shipped inside installed packages, each with a
  stated drift, written to CSV the way a user would bring them.

Application code, not a contract: nothing in a component imports it.
"""

from flywheel.demo.datasets import DATASETS, DatasetInfo, Drift, load, write_csv
from flywheel.demo.fed_report import round_trust, write_fed_report
from flywheel.demo.files import (
    TRUSTED_SHARE,
    DemoData,
    dataset_files,
    init_trusted,
    read_stream,
    synthetic_files,
)
from flywheel.demo.loop import (
    DemoConfig,
    DemoResult,
    Trace,
    count_topic,
    demo_api_key,
    embedded_stack,
    frozen_predictor,
    learned_examples,
    running_feedback_worker,
    running_learner,
    running_loop,
    running_service,
    simulate_app,
    wait_joined,
)
from flywheel.demo.report import (
    RECOVERY_MARGIN,
    SETTLED_SHARE,
    freshness,
    plot_accuracy,
    privacy_summary,
    summarize,
    write_report,
)

__all__ = [
    "DATASETS",
    "RECOVERY_MARGIN",
    "SETTLED_SHARE",
    "TRUSTED_SHARE",
    "DemoConfig",
    "DemoData",
    "DatasetInfo",
    "DemoResult",
    "Drift",
    "Trace",
    "count_topic",
    "dataset_files",
    "demo_api_key",
    "embedded_stack",
    "freshness",
    "init_trusted",
    "frozen_predictor",
    "learned_examples",
    "load",
    "plot_accuracy",
    "privacy_summary",
    "read_stream",
    "running_feedback_worker",
    "running_learner",
    "running_loop",
    "running_service",
    "simulate_app",
    "summarize",
    "synthetic_files",
    "wait_joined",
    "write_csv",
    "round_trust",
    "write_fed_report",
    "write_report",
]
