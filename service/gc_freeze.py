"""Keep the garbage collector's full collections off the request path.

After startup a serving process holds ~250,000 long-lived objects (torch, FastAPI,
pydantic, the model). Every full (generation 2) collection walks all of them: ~0.3 s on
a 2-core machine, during which no request is served; under load that happened every
1-2 s (docs/serving.md). `gc.freeze()` once startup is done moves them to the permanent
generation, which collections skip; objects created later are collected as before.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_after_startup() -> bool:
    """Collect once, then freeze what survives; only the first call per process does it
    (a test process builds many apps). Returns whether this call froze."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        gc.collect()
        gc.freeze()
        _frozen = True
        return True
