"""The model registry contract: one MLflow registered model, alias `champion` is served.

Both the learner (which publishes) and the service (which follows) go through this
module, so tags, artifact layout and alias semantics are defined once.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NewType

from pydantic import SecretStr

from flywheel.settings import (
    CHAMPION_ALIAS,
    LIVE_ROLES,
    RegistrySettings,
    Settings,
    StateSettings,
)
from flywheel.signing import (
    Approval,
    SigningKeyError,
    create_key_pair,
    default_key_paths,
    load_private_key,
    sign,
)

if TYPE_CHECKING:  # torch: ~2 s of import (10 s on a busy machine) that a read of tags
    from torch import nn  # (`flywheel models list`, `status`) never needs

    from flywheel.modelspec import AnySpec

log = logging.getLogger(__name__)
EXPERIMENT = "flywheel"
ARTIFACT_PATH = "model"
VERSION_TAGS = ("parent_version", "source", "examples", "epsilon", "delta", "gate")
SOURCES = ("online", "federated", "manual", "init")
SCHEMA_TAG = "schema_fingerprint"  # set by `publish` on every version whose spec has a schema
HISTORY_TAG = "champion_history"  # on the registered model: JSON list, oldest first
HISTORY_LIMIT = 200


def mlflow_credentials(state: StateSettings) -> dict[str, str]:
    """MLflow's own variables for the FLYWHEEL_MLFLOW_TRACKING_* credentials that are set.

    MLflow's REST client reads its credentials only from the environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN,
    MLFLOW_TRACKING_SERVER_CERT_PATH), on every request; `Registry` puts these there, so a
    deployment configures the tracking server like everything else, through FLYWHEEL_*
    settings (validated, in one env file), and a set Flywheel setting wins over a stale
    MLflow variable. Unset settings leave MLflow's variables as they are.
    """
    values = {
        "MLFLOW_TRACKING_USERNAME": state.mlflow_tracking_username,
        "MLFLOW_TRACKING_PASSWORD": state.mlflow_tracking_password,
        "MLFLOW_TRACKING_TOKEN": state.mlflow_tracking_token,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": state.mlflow_tracking_server_cert_path,
    }
    out = {}
    for name, value in values.items():
        if isinstance(value, SecretStr):
            out[name] = value.get_secret_value()
        elif value is not None:
            out[name] = str(value)
    return out


class RegistryError(ValueError):
    """A registry request that cannot be done as asked (unknown version, nothing to undo)."""


ModelVersion = NewType("ModelVersion", str)
"""A registered version's number as MLflow writes it ("1", "2", ...).

A type of its own so that the type checker refuses any other string (a model name, a
run id, a tag's raw text) where a version is meant; text from outside becomes one only
through `parse_version`, which checks it.
"""


def parse_version(text: object) -> ModelVersion:
    """A version number from outside (a CLI argument, a URL, a tag, an event), checked.

    >>> parse_version(" 12 ")
    '12'
    >>> parse_version("v3")
    Traceback (most recent call last):
    ...
    flywheel.registry.RegistryError: a model version is a whole number from 1, got 'v3'
    """
    value = str(text).strip()
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise RegistryError(f"a model version is a whole number from 1, got {text!r}")
    return ModelVersion(str(int(value)))


@dataclass(frozen=True)
class VersionInfo:
    """What the registry knows about one version, without loading its weights."""

    version: ModelVersion
    tags: dict[str, str]
    run_id: str | None
    created_at: datetime
    is_champion: bool
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedVersion:
    name: str
    version: ModelVersion
    spec: AnySpec  # a registered version may be a cascade
    module: nn.Module
    tags: dict[str, str] = field(default_factory=dict)
    artifact_sha256: str = ""  # of the downloaded spec.json, which names the weights' SHA-256


class Registry:
    """Thin, typed access to the MLflow registry with Flywheel's conventions.

    Build one per process, at its edge (`Registry.of(settings)`), and pass it in: a
    client is a connection pool and an import of MLflow (~1.7 s), not a value.
    """

    def __init__(self, state: StateSettings, registry: RegistrySettings) -> None:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient  # heavy import, only for processes that need it

        self.state = state
        self.settings = registry
        self.name = registry.model_name
        self.factories = registry.factories  # modules trusted to build `factory` models
        uri = state.resolved_mlflow_uri
        os.environ.update(mlflow_credentials(state))
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            # MLflow creates and migrates its tables on first use, silently (its logger is
            # at WARNING here): 6 s on the 2-core test machine under load
            log.info("creating the MLflow store %s (its tables: a few seconds)", uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @classmethod
    def of(cls, settings: Settings) -> Registry:
        """The registry a whole configuration names (for the wiring at a process's edge)."""
        return cls(settings.state, settings.registry)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        # A tracking server (http[s]://, docker/compose.yaml) stores artifacts itself, where
        # every process can read them; a local store keeps them inside FLYWHEEL_HOME.
        remote = self.client.tracking_uri.split(":", 1)[0] in ("http", "https")
        location = None if remote else self.state.mlflow_artifacts_dir.as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def champion_version(self) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.name, CHAMPION_ALIAS)
            return ModelVersion(str(mv.version))
        except MlflowException:
            return None

    def load(self, version: ModelVersion) -> LoadedVersion:
        import mlflow

        mv = self.client.get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=tmp, tracking_uri=self.client.tracking_uri
            )
            from flywheel.artifacts import SPEC_FILE, load_model

            spec, module = load_model(Path(local), factories=self.factories)
            digest = hashlib.sha256((Path(local) / SPEC_FILE).read_bytes()).hexdigest()
        return LoadedVersion(
            self.name, ModelVersion(str(mv.version)), spec, module, dict(mv.tags), digest
        )

    def artifact_sha256(self, version: ModelVersion) -> str:
        """The SHA-256 of the version's stored `spec.json` (which holds the weights'
        SHA-256): what a promotion signature vouches for. Downloads that one small file."""
        import mlflow

        from flywheel.artifacts import SPEC_FILE

        mv = self.client.get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="flywheel-sign-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{mv.source}/{SPEC_FILE}",
                dst_path=tmp,
                tracking_uri=self.client.tracking_uri,
            )
            return hashlib.sha256(Path(local).read_bytes()).hexdigest()

    def signing_key_path(self) -> Path:
        """FLYWHEEL_SIGNING_KEY, or the home's default key (created here on first use)."""
        if self.settings.signing_key is not None:
            return self.settings.signing_key.expanduser()
        private, public = default_key_paths(self.state.home_dir)
        if not private.exists():
            try:
                kid = create_key_pair(private, public)
            except SigningKeyError:  # another process created it first
                return private
            logging.getLogger(__name__).warning(
                "created the promotion signing key %s (key id %s); the service trusts %s",
                private,
                kid,
                public,
            )
        return private

    def sign(
        self, version: ModelVersion, *, gate: str | None = None, approval: Approval | None = None
    ) -> dict[str, str]:
        """Sign `version`'s promotion (its artifact, and the gate pass or the approval it is
        promoted on) and store the statement as version tags; returns them."""
        key = load_private_key(self.signing_key_path())
        tags = sign(
            key,
            model=self.name,
            version=version,
            artifact_sha256=self.artifact_sha256(version),
            gate=gate,
            approval=approval,
        )
        self.set_tags(version, tags)
        return tags

    def publish(
        self,
        spec: AnySpec,
        module: nn.Module,
        *,
        tags: dict[str, str],
        params: dict[str, object] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ModelVersion:
        """Log a run with the artifact and register it as a new version; returns the version."""
        missing = [t for t in VERSION_TAGS if t not in tags]
        if missing:
            raise ValueError(f"a model version needs tags {missing}")
        if tags["source"] not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {tags['source']!r}")
        schema = getattr(spec, "schema", None)
        if schema is not None:  # every version of a lineage says which schema it reads
            fingerprint = schema.fingerprint()
            tags = {SCHEMA_TAG: fingerprint, **tags}
            if tags[SCHEMA_TAG] != fingerprint:
                raise ValueError(
                    f"tag {SCHEMA_TAG}={tags[SCHEMA_TAG]!r}, but the spec's schema is {fingerprint}"
                )
        run = self.client.create_run(
            self._experiment_id(), tags={"flywheel.source": tags["source"]}
        )
        run_id = run.info.run_id
        try:
            self._log_batch(run_id, params or {}, metrics or {})
            with tempfile.TemporaryDirectory(prefix="flywheel-publish-") as tmp:
                from flywheel.artifacts import save_model

                save_model(Path(tmp), spec, module)
                self.client.log_artifacts(run_id, tmp, artifact_path=ARTIFACT_PATH)
        except Exception:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id)
        self._ensure_registered_model()
        mv = self.client.create_model_version(
            self.name,
            source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
        )
        return ModelVersion(str(mv.version))

    def _log_batch(self, run_id: str, params: dict[str, object], metrics: dict[str, float]) -> None:
        """Params and metrics in one `log_batch` per 100 params (MLflow's limit per call)
        instead of one write each: a DP candidate has ~23 params and ~18 metrics, and each
        single write was a store transaction: 319 ms against 1678 ms per such publish, side
        by side on one SQLite store (2026-12-07, 2 cores at load ~9; docs/privacy.md)."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        # values as log_param / log_metric would store them
        param_rows = [Param(k, str(v)) for k, v in params.items()]
        metric_rows = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, max(len(param_rows), len(metric_rows), 1), 100):
            chunk_p, chunk_m = param_rows[i : i + 100], metric_rows[i : i + 100]
            if chunk_p or chunk_m:
                self.client.log_batch(run_id, metrics=chunk_m, params=chunk_p)

    def delete_version(self, version: ModelVersion) -> None:
        """Remove a registered version (its run and artifacts stay, for the record): how
        `flywheel init` withdraws a version whose store writes did not commit."""
        self.client.delete_model_version(self.name, version)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name)
            except MlflowException:  # created concurrently
                self.client.get_registered_model(self.name)

    def set_champion(
        self, version: ModelVersion, *, gate: str | None = None, approval: Approval | None = None
    ) -> None:
        """Sign `version`'s promotion (on `gate`, a pass the caller computed, or else an
        approval: `approval`, by default the user running this, as `flywheel init` is),
        move the alias and remember it in the champion history (what rollback undoes)."""
        if gate is None and approval is None:
            approval = Approval(_user(), "set as champion")
        self.sign(version, gate=gate, approval=approval)
        self._move_alias(version)

    def _move_alias(self, version: ModelVersion) -> None:
        self.client.set_registered_model_alias(self.name, CHAMPION_ALIAS, version)
        history = self.champion_history()
        if not history or history[-1] != version:
            history.append(version)
        self._set_history(history[-HISTORY_LIMIT:])

    def champion_history(self) -> list[ModelVersion]:
        """Versions that were champion, oldest first (rolled-back ones removed)."""
        from mlflow.exceptions import MlflowException

        try:
            raw = self.client.get_registered_model(self.name).tags.get(HISTORY_TAG)
        except MlflowException:
            return []
        return [ModelVersion(str(v)) for v in json.loads(raw)] if raw else []

    def _set_history(self, history: list[ModelVersion]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))

    def set_tags(self, version: ModelVersion, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, version, k, str(v))

    def exists(self, version: ModelVersion) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(self.name, version)
        except MlflowException:
            return False
        return True

    def promote(
        self, version: ModelVersion, *, reason: str, actor: str, gate: str | None = None
    ) -> ModelVersion | None:
        """Make `version` the champion; returns the one it replaced. Recorded as tags and
        signed: on `gate` (a pass the caller computed itself: the learner, the federated
        server), else as `actor`'s approval for `reason` (review, `flywheel models promote`)."""
        if not self.exists(version):
            raise RegistryError(f"{self.name} has no version {version!r}")
        previous = self.champion_version()
        approval = None if gate is not None else Approval(actor, reason)
        self.sign(version, gate=gate, approval=approval)  # first: no key, nothing changes
        self.set_tags(
            version, {"promoted_at": _now_iso(), "promoted_by": actor, "promotion_reason": reason}
        )
        self._move_alias(version)
        return previous

    def rollback(self, *, reason: str, actor: str) -> tuple[ModelVersion, ModelVersion]:
        """Move the alias back to the previous champion; returns (from, to)."""
        history = self.champion_history()
        current = self.champion_version()
        if current is None:
            raise RegistryError(f"{self.name} has no champion to roll back")
        if history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryError(f"{self.name} v{current} has no earlier champion to go back to")
        target = history[-1]
        self.client.set_registered_model_alias(self.name, CHAMPION_ALIAS, target)
        self._set_history(history)
        self.set_tags(
            current,
            {"rolled_back_at": _now_iso(), "rolled_back_by": actor, "rollback_reason": reason},
        )
        return current, target

    def role_version(self, role: str) -> ModelVersion | None:
        """The version holding `role` (`champion` or one of `LIVE_ROLES`), None if none."""
        from mlflow.exceptions import MlflowException

        if role != CHAMPION_ALIAS and role not in LIVE_ROLES:
            raise RegistryError(f"unknown role {role!r}; one of {(CHAMPION_ALIAS, *LIVE_ROLES)}")
        try:
            mv = self.client.get_model_version_by_alias(self.name, role)
        except MlflowException:
            return None
        return ModelVersion(str(mv.version))

    def roles(self) -> dict[str, ModelVersion]:
        """Every role that is held now -> its version: `champion`, `shadow`, `canary`,
        `guard` (issue 28). One registry read: the registered model lists its aliases."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException:
            return {}
        wanted = (CHAMPION_ALIAS, *LIVE_ROLES)
        return {a: ModelVersion(str(v)) for a, v in dict(aliases).items() if a in wanted}

    def set_role(
        self,
        version: ModelVersion,
        role: str,
        *,
        reason: str,
        actor: str,
        gate: str | None = None,
    ) -> ModelVersion | None:
        """Make `version` the `role` (a shadow, canary or guard); returns the version that
        held it. Signed like a promotion (on `gate`, else as `actor`'s approval for
        `reason`): a service loads a role's weights only when their signature verifies,
        as it does the champion's. Recorded as tags `<role>_at`, `<role>_by`,
        `<role>_reason` on the version."""
        if role not in LIVE_ROLES:
            raise RegistryError(f"unknown role {role!r}; one of {LIVE_ROLES}")
        if not self.exists(version):
            raise RegistryError(f"{self.name} has no version {version!r}")
        previous = self.role_version(role)
        approval = None if gate is not None else Approval(actor, reason)
        self.sign(version, gate=gate, approval=approval)  # first: no key, nothing changes
        self.set_tags(
            version, {f"{role}_at": _now_iso(), f"{role}_by": actor, f"{role}_reason": reason}
        )
        self.client.set_registered_model_alias(self.name, role, version)
        return previous

    def clear_role(self, role: str, *, reason: str, actor: str) -> ModelVersion | None:
        """Nobody holds `role` any more; returns who did (None: nobody did). Tagged
        `<role>_ended_at`, `<role>_ended_by`, `<role>_end_reason` on that version."""
        if role not in LIVE_ROLES:
            raise RegistryError(f"unknown role {role!r}; one of {LIVE_ROLES}")
        previous = self.role_version(role)
        if previous is None:
            return None
        self.client.delete_registered_model_alias(self.name, role)
        self.set_tags(
            previous,
            {
                f"{role}_ended_at": _now_iso(),
                f"{role}_ended_by": actor,
                f"{role}_end_reason": reason,
            },
        )
        return previous

    def versions(self, *, with_runs: bool = False) -> list[VersionInfo]:
        """Every version, newest first; `with_runs` adds each run's params and metrics."""
        champion = self.champion_version()
        found = self.client.search_model_versions(f"name = '{self.name}'")
        out = [self._info(mv, champion, with_runs) for mv in found]
        return sorted(out, key=lambda v: int(v.version) if v.version.isdigit() else 0, reverse=True)

    def info(self, version: ModelVersion, *, with_run: bool = True) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise RegistryError(f"{self.name} has no version {version!r}") from None
        return self._info(mv, self.champion_version(), with_run)

    def _info(self, mv: object, champion: ModelVersion | None, with_run: bool) -> VersionInfo:
        version = ModelVersion(str(mv.version))  # type: ignore[attr-defined]
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        run_id = mv.run_id  # type: ignore[attr-defined]
        if with_run and run_id:
            data = self.client.get_run(run_id).data
            metrics, params = dict(data.metrics), dict(data.params)
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)  # type: ignore[attr-defined]
        return VersionInfo(
            version,
            dict(mv.tags),  # type: ignore[attr-defined]
            run_id,
            created,
            version == champion,
            metrics,
            params,
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
