"""Wiring a feedback worker from settings: store, reference data, model loader.

`build_worker` is the process edge: it takes the whole `Settings` (it opens the store,
builds the process's one `Registry`) and hands each part only its groups -- the worker
`feedback` and `kafka`, the reference data `registry`.

The analyzer needs the lineage's trusted set (`flywheel init` writes it). A worker started
on a deployment without one refuses to start (`NoTrustedData`, naming the command), except
while the registry is still empty: then the first model's bootstrap is still to come (a
compose deployment starts every process at once) and the worker waits for it, up to
`TRUSTED_WAIT_S`.

The registry (MLflow, ~1.2-4 s to import on a 2-core machine) is built on first use or,
in `flywheel feedback`, on a background thread while the worker joins its group: a worker
whose lineage has its trusted set needs it only to load served versions for the first
batch's gradient-sign variants (docs/benchmarks.md, "Start-up").

Start-up waits out a store or registry that is down (`flywheel.retry`, FLYWHEEL_RETRY_*),
saying so in the `DependencyStatus` it is given, instead of exiting; a store whose schema
is not this code's (SchemaNotCurrent) or a refusal no retry fixes (`Fatal`) still ends it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from flywheel.feedback.corroboration import Corroborator
from flywheel.feedback.examples import ExampleBuilder, ModelLoader
from flywheel.feedback.observer import WorkerObserver
from flywheel.feedback.reference_data import LabelledPool, ensure_reference
from flywheel.feedback.worker import FeedbackWorker
from flywheel.retry import Backoff, DependencyStatus, retry_call
from flywheel.settings import Settings
from flywheel.store import KeyBook, NoTrustedData, open_store, session_factory, trusted_info

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from torch import nn

    from flywheel.registry import LoadedVersion, ModelVersion, Registry

log = logging.getLogger(__name__)
T = TypeVar("T")
SWITCH_INTERVAL_S = 0.0005
TRUSTED_WAIT_S = 600.0  # how long a worker on an empty registry waits for the trusted set
TRUSTED_POLL_S = 2.0
RELEASE_EVERY_S = 30.0  # corroboration checks of a running worker (see Corroborator)


class VersionSource(Protocol):
    """What the worker reads from the registry: a `Registry`, or a `LazyRegistry`."""

    def champion_version(self) -> ModelVersion | None: ...
    def load(self, version: ModelVersion) -> LoadedVersion: ...


class LazyRegistry:
    """The process's one `Registry`, built (MLflow imported) on first use; `prewarm()`
    builds it on a background thread instead. Thread-safe; a failed build is tried again
    on the next use."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._registry: Registry | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Registry:
        with self._lock:
            if self._registry is None:
                from flywheel.registry import Registry

                self._registry = Registry.of(self._settings)
            return self._registry

    def champion_version(self) -> ModelVersion | None:
        return self().champion_version()

    def load(self, version: ModelVersion) -> LoadedVersion:
        return self().load(version)

    def prewarm(self) -> threading.Thread:
        """Build it now on a daemon thread, then freeze what the import left (as
        `tune_worker_process` froze the rest), so full collections skip MLflow's objects."""

        def build() -> None:
            import gc

            try:
                self()
            except Exception as exc:  # the first batch that needs it tries again
                log.warning("registry not built ahead of use (%s)", exc)
                return
            gc.collect()
            gc.freeze()

        thread = threading.Thread(target=build, name="flywheel-registry-prewarm", daemon=True)
        thread.start()
        return thread


def registry_model_loader(registry: VersionSource) -> ModelLoader:
    """Served versions, loaded from `registry` once each, for gradient-sign variants.

    A version arrives as the text a prediction event carried (stored with the
    prediction), so it is checked here, where it meets the registry: one that is not a
    version number raises, and `ExampleBuilder` skips that version's gradient-sign step.
    """
    from flywheel.registry import parse_version

    def load(version: str) -> tuple[list[str], nn.Module]:
        loaded = registry.load(parse_version(version))
        return loaded.spec.labels, loaded.module

    return load


def tune_worker_process() -> None:
    """Process-wide settings for a process whose job is one feedback worker (the CLI, the
    benchmark); not applied by `build_worker`, since they would change a host process.

    - torch on one thread: the gradient-sign step is a ~100 x 8 batch; two intra-op
      threads on a 2-core machine shared with PostgreSQL wait for each other, and the
      step took 4x as long as on one thread.
    - numpy's BLAS (OpenBLAS) on one thread, for the same reason: its idle workers spin
      after every small matrix product of the analysis, and burned 40 % of the worker's
      CPU in `bench feedback` (7.7 -> 4.5 CPU-s for 50,000 corrections) -- CPU that
      PostgreSQL, on the same cores, needed.
    - `gc.freeze()` once the worker is built: the ~650,000 objects from its imports
      (MLflow, torch, SQLAlchemy) are no longer walked by every full collection while
      batches allocate millions of short-lived ones (~2 s of an 11 s benchmark run).
    - young-generation collections every 50,000 allocations instead of 700: a batch
      allocates ~100,000 containers, nearly all acyclic and alive until the batch is
      stored, and each collection walked them again to free nothing (decoding took 27
      instead of 13 us a correction).
    - a GIL switch interval of 0.5 ms instead of 5: the store thread gets the GIL back
      sooner after each PostgreSQL round trip (~15 a batch), so the database waits less
      for its next statement. `bench feedback`, alternating rounds on one VM: 3.42-4.58 s
      a worker run at 0.5 ms against 3.84-5.06 s at 5 ms (each pair ~10 % apart); 0.2 ms
      was no better (3.94-5.26 s).
    """
    import gc
    import sys

    import torch
    from threadpoolctl import threadpool_limits

    from flywheel.gc_freeze import freeze_after_startup

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    freeze_after_startup()


def build_worker(
    settings: Settings,
    client_id: str | None = None,
    observer: WorkerObserver | None = None,
    status: DependencyStatus | None = None,
    stop: threading.Event | None = None,
    prewarm: bool = False,
) -> FeedbackWorker:
    """Refuses a store that is not migrated to this code's schema (SchemaNotCurrent).
    `observer` sees the worker's assignments and step timings (`WorkerObserver`);
    `status` hears which dependency start-up is waiting for; `stop` ends that wait;
    `prewarm` builds the registry on a background thread once the rest is built."""
    feedback = settings.feedback
    status = status or DependencyStatus()
    policy = Backoff.of(settings.retry)

    def retrying(dependency: str, fn: Callable[[], T], what: str) -> T:
        return retry_call(
            fn, dependency=dependency, policy=policy, status=status, stop=stop, what=what
        )

    url = settings.state.resolved_database_url
    engine = retrying("store", lambda: open_store(url), "opening the store")
    registry = LazyRegistry(settings)
    wait_for_trusted_set(engine, settings.registry.model_name, registry, retrying=retrying)

    def load_reference() -> tuple[Any, LabelledPool]:
        with session_factory(engine).begin() as session:
            reference = ensure_reference(session, settings.registry)
            return reference, LabelledPool.load(session, reference, settings.registry.model_name)

    reference, pool = retrying("store", load_reference, "loading the reference data")
    builder = ExampleBuilder(feedback, pool, registry_model_loader(registry))
    keys = None
    if settings.access.auth == "on":  # corrections must be signed (feedback/signatures.py)
        keys = KeyBook(lambda: engine, settings.access.auth_cache_ttl_s)
    else:
        log.warning(
            "FLYWHEEL_AUTH=off: corrections are not checked for an app's signature and keep "
            "the source they name; for local experiments only (docs/security.md)"
        )
    if prewarm:
        registry.prewarm()
    return FeedbackWorker(
        feedback,
        settings.kafka,
        engine,
        builder,
        client_id=client_id,
        observer=observer,
        release=Corroborator(reference, feedback.holdout_fraction, every_s=RELEASE_EVERY_S),
        retry=settings.retry,
        status=status,
        keys=keys,
    )


class Retrying(Protocol):
    """How `wait_for_trusted_set` runs each look at a dependency."""

    def __call__(self, dependency: str, fn: Callable[[], T], what: str) -> T: ...


def _once(dependency: str, fn: Callable[[], T], what: str) -> T:
    """One look, no retry."""
    del dependency, what
    return fn()


def wait_for_trusted_set(
    engine: Engine,
    model_name: str,
    registry: VersionSource,
    *,
    timeout_s: float = TRUSTED_WAIT_S,
    poll_s: float = TRUSTED_POLL_S,
    retrying: Retrying = _once,
) -> None:
    """Return once `model_name` has a trusted set; `NoTrustedData` at once if the registry
    has a champion without one (nothing will write it: the operator must run `flywheel
    init`), or after `timeout_s` of an empty registry. `retrying(dependency, fn, what)`
    runs each look at the store and the registry (`build_worker`: waiting out outages)."""
    deadline = time.monotonic() + timeout_s
    logged = False

    def has_trusted() -> bool:
        with session_factory(engine)() as session:
            return trusted_info(session, model_name) is not None

    while True:
        if retrying("store", has_trusted, "reading the trusted set"):
            return
        champion = retrying("registry", registry.champion_version, "reading the champion")
        if champion is not None or time.monotonic() >= deadline:
            raise NoTrustedData(model_name)
        if not logged:
            log.info(
                "waiting for the trusted data set of %s (up to %.0f s): the first model's "
                "bootstrap writes it, or run `flywheel init`",
                model_name,
                timeout_s,
            )
            logged = True
        time.sleep(poll_s)
