"""The model registry contract: one MLflow registered model, alias `champion` is served.

Both the learner (which publishes) and the service (which follows) go through this
module, so tags, artifact layout and alias semantics are defined once.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from flywheel.artifacts import load_model, save_model
from flywheel.modelspec import ModelSpec
from flywheel.settings import CHAMPION_ALIAS, Settings

EXPERIMENT = "flywheel"
ARTIFACT_PATH = "model"
VERSION_TAGS = ("parent_version", "source", "examples", "epsilon", "delta", "gate")
SOURCES = ("online", "federated", "manual")


@dataclass(frozen=True)
class LoadedVersion:
    name: str
    version: str
    spec: ModelSpec
    module: nn.Module
    tags: dict[str, str] = field(default_factory=dict)


class Registry:
    """Thin, typed access to the MLflow registry with Flywheel's conventions."""

    def __init__(self, settings: Settings) -> None:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient  # heavy import, only for processes that need it

        self.settings = settings
        self.name = settings.model_name
        uri = settings.resolved_mlflow_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = self.settings.mlflow_artifacts_dir.as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def champion_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, CHAMPION_ALIAS).version)
        except MlflowException:
            return None

    def load(self, version: str) -> LoadedVersion:
        import mlflow

        mv = self.client.get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=tmp, tracking_uri=self.client.tracking_uri
            )
            spec, module = load_model(Path(local))
        return LoadedVersion(self.name, str(mv.version), spec, module, dict(mv.tags))

    def publish(
        self, spec: ModelSpec, module: nn.Module, *, tags: dict[str, str],
        params: dict[str, object] | None = None, metrics: dict[str, float] | None = None,
    ) -> str:
        """Log a run with the artifact and register it as a new version; returns the version."""
        missing = [t for t in VERSION_TAGS if t not in tags]
        if missing:
            raise ValueError(f"a model version needs tags {missing}")
        if tags["source"] not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {tags['source']!r}")
        run = self.client.create_run(self._experiment_id(),
                                     tags={"flywheel.source": tags["source"]})
        run_id = run.info.run_id
        try:
            for k, v in (params or {}).items():
                self.client.log_param(run_id, k, v)
            for k, v in (metrics or {}).items():
                self.client.log_metric(run_id, k, float(v))
            with tempfile.TemporaryDirectory(prefix="flywheel-publish-") as tmp:
                save_model(Path(tmp), spec, module)
                self.client.log_artifacts(run_id, tmp, artifact_path=ARTIFACT_PATH)
        except Exception:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id)
        self._ensure_registered_model()
        mv = self.client.create_model_version(
            self.name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
        )
        return str(mv.version)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name)
            except MlflowException:  # created concurrently
                self.client.get_registered_model(self.name)

    def set_champion(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, CHAMPION_ALIAS, version)
