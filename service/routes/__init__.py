"""The service's HTTP routes, one `APIRouter` per job; `flywheel.service.create_app`
assembles them. Handlers get what they share through the `State` dependency
(`flywheel.service.state`), so each router can be mounted on its own, with its own state.
"""

from flywheel.service.routes import admin, corrections, health, metrics, model, predict, review, v2

__all__ = ["admin", "corrections", "health", "metrics", "model", "predict", "review", "v2"]
