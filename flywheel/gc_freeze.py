"""Keep the garbage collector's full collections off the hot path of long-lived processes.

After startup a Flywheel process holds hundreds of thousands of long-lived objects from
its imports and models (torch, MLflow, SQLAlchemy, FastAPI, pydantic): ~250,000 in the
service, ~650,000 in a feedback worker. Every full (generation 2) collection walks all
of them -- ~0.3 s on a 2-core machine, during which the service answers no request and
the feedback worker processes no record; under load that happened every 1-2 s
(docs/serving.md, docs/benchmarks.md). `gc.freeze()` once startup is done moves them to
the permanent generation, which collections skip; objects created later are collected
as before.
"""

from __future__ import annotations

import atexit
import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_after_startup() -> bool:
    """Collect once, then freeze what survives; only the first call per process does it
    (a test process builds many apps and workers). Returns whether this call froze."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        gc.collect()
        gc.freeze()
        # At exit, let the final collections free them again: native extensions
        # (nanobind, in triton) otherwise report the frozen objects as leaks.
        atexit.register(gc.unfreeze)
        _frozen = True
        return True


__all__ = ["freeze_after_startup"]
