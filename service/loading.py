"""Getting the champion from the registry into a servable, warmed model."""

from __future__ import annotations

import logging

from flywheel.learner import ensure_champion
from flywheel.registry import LoadedVersion, ModelVersion, Registry
from flywheel.service.model_holder import ServedModel
from flywheel.service.trust import PromotionTrust, UntrustedChampion
from flywheel.settings import ServiceSettings, TrustedSettings

log = logging.getLogger(__name__)


def load_champion(
    registry: Registry,
    trusted: TrustedSettings,
    service: ServiceSettings,
    trust: PromotionTrust | None = None,
) -> ServedModel:
    """Load the version behind alias `champion`, bootstrapping one from the `trusted` seed
    data if the registry is empty; served at `service`'s `serve_precision`.

    With `trust`, a champion whose promotion signature does not verify is not served: the
    newest earlier champion (the alias's history) that verifies is, with an error saying
    so; if none does, `UntrustedChampion` ends start-up with the reasons."""
    version = ensure_champion(trusted, registry)
    loaded = registry.load(version)
    if trust is not None:
        why = trust.refusal(loaded)
        if why is not None:
            loaded = _newest_trusted(registry, version, why, trust)
    if loaded.version != version:
        log.error(
            "serving %s v%s, the newest earlier champion with a trusted promotion, instead of v%s",
            loaded.name,
            loaded.version,
            version,
        )
    return ServedModel.prepare(
        loaded.name, loaded.version, loaded.spec, loaded.module, service.serve_precision
    )


def _newest_trusted(
    registry: Registry, champion: ModelVersion, why: str, trust: PromotionTrust
) -> LoadedVersion:
    """The newest earlier champion whose promotion verifies (`champion` was refused: `why`)."""
    reasons = [f"v{champion}: {why}"]
    for version in dict.fromkeys(reversed(registry.champion_history())):
        if version == champion:
            continue
        loaded = registry.load(version)
        refused = trust.refusal(loaded)
        if refused is None:
            return loaded
        reasons.append(f"v{version}: {refused}")
        if len(reasons) >= 20:  # a long history of refusals says enough
            break
    raise UntrustedChampion(
        f"no champion of {registry.name} carries a trusted promotion signature "
        f"({'; '.join(reasons)}); sign one with `flywheel models promote VERSION` where "
        "FLYWHEEL_SIGNING_KEY is, or check FLYWHEEL_TRUSTED_KEYS (docs/security.md)"
    )
