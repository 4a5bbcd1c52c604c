"""`python -m flywheel.learner.federated.supernode [flower-supernode args]`: a SuperNode
that polls the SuperLink every FLYWHEEL_FED_POLL_S instead of every 3 s.

Flower 1.41's SuperNode loop sleeps a hard-coded 3 s whenever the SuperLink has no message
for it, and 0.5 s between checks for the ClientApp's reply
(`flwr.supernode.start_client_internal`); neither is configurable. This launcher runs the
unmodified `flower-supernode` entry point with that module's `time.sleep` capped at the
poll interval, nothing else changed. Documented in docs/federated.md; re-check on a Flower
upgrade (the test suite measures the round overhead, so a regression shows).
"""

from __future__ import annotations

import os
import sys
import time
import types

POLL_ENV = "FLYWHEEL_FED_POLL_S"


def patch(poll_s: float) -> None:
    import flwr.supernode.start_client_internal as loop

    shim = types.SimpleNamespace(
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    )
    shim.sleep = lambda seconds: time.sleep(min(float(seconds), poll_s))
    loop.time = shim  # type: ignore[assignment]


def main() -> None:
    patch(float(os.environ.get(POLL_ENV, "0.1")))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
