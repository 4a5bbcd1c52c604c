"""The Flower ServerApp: one federated run on the platform (see `server.FederatedRun`).

Started by the SuperLink (`flywheel fed superlink`) for each `flwr run` that
`flywheel fed server` submits; it inherits the SuperLink's FLYWHEEL_* environment
(registry, platform store, ledger) and takes the run's choices from the run config.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flywheel.learner.federated.config import FederatedConfig
from flywheel.learner.federated.server import FederatedRun, RunOptions

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flywheel.registry import Registry
    from flywheel.settings import load_settings, prepare_home

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings()
    prepare_home(settings)
    options = RunOptions.from_settings(
        settings.federated, settings.trusted, **dict(context.run_config)
    )
    # one per run
    FederatedRun(FederatedConfig.of(settings), options, Registry.of(settings)).run(grid)
