"""Federated learning: customer sites train on data that never leaves them.

`client_app` (the ClientApp a site's SuperNode runs), `server_app` (the ServerApp the
SuperLink starts per run) and `server.FederatedRun` (rounds, client-level ε in the
ledger, gate, registry, promotion); `worker` and `supernode` cut Flower's per-round
latency; `processes` starts it all. See docs/federated.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute). Loaded on first use: Flower and torch cost seconds to
# import, and `flywheel fed superlink` needs neither.
_LAZY = {
    "BIN": ("processes", "BIN"),
    "CONNECTION": ("processes", "CONNECTION"),
    "LocalFederation": ("processes", "LocalFederation"),
    "SecurityError": ("processes", "SecurityError"),
    "process_env": ("processes", "process_env"),
    "submit_run": ("processes", "submit_run"),
    "superlink_command": ("processes", "superlink_command"),
    "supernode_command": ("processes", "supernode_command"),
    "write_connection": ("processes", "write_connection"),
    "CLIPPING_CHOICES": ("server", "CLIPPING_CHOICES"),
    "STRATEGY_CHOICES": ("server", "STRATEGY_CHOICES"),
    "FederatedConfig": ("config", "FederatedConfig"),
    "Site": ("client_app", "Site"),
    "FederatedRun": ("server", "FederatedRun"),
    "RunOptions": ("server", "RunOptions"),
    "current_site": ("client_app", "current_site"),
    "site_app": ("client_app", "app"),
    "serve_site_worker": ("worker", "serve"),
    "run_demo": ("demo", "run_demo"),
}
__all__ = [
    "BIN",
    "CLIPPING_CHOICES",
    "CONNECTION",
    "FederatedConfig",
    "FederatedRun",
    "LocalFederation",
    "RunOptions",
    "STRATEGY_CHOICES",
    "SecurityError",
    "Site",
    "current_site",
    "process_env",
    "run_demo",
    "serve_site_worker",
    "site_app",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "write_connection",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f"flywheel.learner.federated.{module}"), attribute)
    raise AttributeError(f"module 'flywheel.learner.federated' has no attribute {name!r}")
