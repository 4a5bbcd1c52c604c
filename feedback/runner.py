"""Wiring a feedback worker from settings: store, reference data, model loader."""

from __future__ import annotations

from flywheel.feedback.corroboration import release_corroborated
from flywheel.feedback.examples import ExampleBuilder
from flywheel.feedback.reference_data import LabelledPool, ensure_reference
from flywheel.feedback.store import open_store, session_factory
from flywheel.feedback.worker import FeedbackWorker
from flywheel.settings import Settings


def registry_model_loader(settings: Settings):
    """Served versions, loaded from the registry once each, for gradient-sign variants."""
    from flywheel.registry import Registry

    registry = Registry(settings)

    def load(version: str):
        loaded = registry.load(version)
        return loaded.spec.labels, loaded.module

    return load


def build_worker(settings: Settings, client_id: str | None = None) -> FeedbackWorker:
    """Refuses a store that is not migrated to this code's schema (SchemaNotCurrent)."""
    engine = open_store(settings.resolved_database_url)
    with session_factory(engine).begin() as session:
        reference = ensure_reference(session, settings)
        pool = LabelledPool.load(session, reference)
    builder = ExampleBuilder(settings, pool, registry_model_loader(settings))
    return FeedbackWorker(
        settings, engine, builder, client_id=client_id,
        release=lambda session: release_corroborated(session, reference,
                                                     settings.holdout_fraction))
