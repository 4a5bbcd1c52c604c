"""The registry and the training store, each opened once per app and then shared.

One `Registry` serves the whole process: the first load, the registry follower and the
review endpoints all read the same one. It is built on first use, because building one
imports MLflow (about 1.7 s on the development machine), and an app that is handed its model
and never serves the review page should not pay that; a lock keeps two threads (the
follower's worker, a review request) from building two.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from flywheel.settings import RegistrySettings, StateSettings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from flywheel.registry import Registry


class SharedRegistry:
    """Call it for the app's one `Registry`: the one given, or one built on the first call."""

    def __init__(
        self,
        state: StateSettings,
        registry_settings: RegistrySettings,
        registry: Registry | None = None,
    ) -> None:
        self._state = state
        self._registry_settings = registry_settings
        self._registry = registry
        self._lock = threading.Lock()

    def __call__(self) -> Registry:
        with self._lock:
            if self._registry is None:
                from flywheel.registry import Registry

                self._registry = Registry(self._state, self._registry_settings)
            return self._registry


class SharedStore:
    """Call it for `(engine, None)` or `(None, why there is none)`; the engine, once opened,
    is kept, and a store that could not be opened is tried again on the next call."""

    def __init__(self, state: StateSettings) -> None:
        self._state = state
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def __call__(self) -> tuple[Engine | None, str | None]:
        with self._lock:
            if self._engine is not None:
                return self._engine, None
            from flywheel.review import open_store_or_reason

            engine, why = open_store_or_reason(self._state)
            self._engine = engine
            return engine, why
