"""Which registered versions the service may serve: only signed promotions (issue 26, part 5).

The `champion` alias is only a pointer anyone with MLflow access can move, so before a
version is served (at start-up and at every hot swap) its promotion signature
(flywheel.signing) must verify against a trusted public key (`FLYWHEEL_TRUSTED_KEYS`, by
default the home's `keys/promotion.pub`), and the signed statement must name this model,
this version, the SHA-256 of the `spec.json` just downloaded (which holds the weights'
SHA-256) and a gate pass or an approval. A refused version is logged with the reason once
and counted in `flywheel_model_untrusted_total`; the served model stays.

The trusted keys are read again at each check (a few hundred bytes, next to a model
download), so adding the next key during a rotation needs no restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from flywheel.retry import Fatal
from flywheel.settings import RegistrySettings, StateSettings
from flywheel.signing import SigningKeyError, default_key_paths, load_public_keys, verify

if TYPE_CHECKING:
    from prometheus_client import Metric

    from flywheel.registry import LoadedVersion, ModelVersion

log = logging.getLogger(__name__)


class UntrustedChampion(Fatal):
    """No version the champion alias names (now or before) carries a trusted promotion."""


class PromotionTrust:
    """Checks a loaded version's promotion signature; counts and logs each refusal once."""

    def __init__(self, registry: RegistrySettings, state: StateSettings) -> None:
        self.enabled = registry.model_trust == "signed"
        self.model_name = registry.model_name
        self.configured = bool(registry.trusted_key_paths)
        self.key_paths: tuple[Path, ...] = registry.trusted_key_paths or (
            default_key_paths(state.home_dir)[1],
        )
        self.refused = 0  # versions refused (each counted once)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def check_keys(self) -> None:
        """At start-up: configured trusted keys that cannot be used stop the service
        (`Fatal`, naming the file). The home's default key may not exist yet: the first
        signer creates it (the service's own seed bootstrap among them)."""
        if not self.enabled or not self.configured:
            return
        try:
            load_public_keys(list(self.key_paths))
        except SigningKeyError as exc:
            raise Fatal(f"FLYWHEEL_TRUSTED_KEYS: {exc}") from None

    def refusal(self, loaded: LoadedVersion) -> str | None:
        """Why `loaded` must not be served, or None (also None when FLYWHEEL_MODEL_TRUST=off)."""
        if not self.enabled:
            return None
        try:
            keys = load_public_keys(list(self.key_paths))
        except SigningKeyError as exc:
            why = f"no trusted key to check it with ({exc})"
        else:
            try:
                verify(
                    loaded.tags,
                    keys,
                    model=self.model_name,
                    version=loaded.version,
                    artifact_sha256=loaded.artifact_sha256,
                )
            except ValueError as exc:
                why = str(exc)
            else:
                return None
        self._note(loaded.version, why)
        return why

    def _note(self, version: ModelVersion, why: str) -> None:
        with self._lock:
            if version in self._seen:
                return
            self._seen.add(version)
            self.refused += 1
        log.error("not serving %s v%s: %s", self.model_name, version, why)


class TrustCollector(Collector):
    """`flywheel_model_untrusted_total`: versions refused for their promotion signature."""

    def __init__(self, trust: PromotionTrust) -> None:
        self._trust = trust

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "flywheel_model_untrusted",
            "Champion versions not served: no promotion signature that verifies against a "
            "trusted key, or no gate pass or approval recorded in it",
            value=float(self._trust.refused),
        )
