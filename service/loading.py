"""Getting the champion from the registry into a servable, warmed model."""

from __future__ import annotations

import logging

from flywheel.learner import ensure_champion
from flywheel.registry import LoadedVersion, Registry
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
    loaded = _trusted(registry, [version, *reversed(registry.champion_history())], trust)
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


def _trusted(registry: Registry, candidates: list, trust: PromotionTrust | None) -> LoadedVersion:
    reasons: list[str] = []
    for version in dict.fromkeys(candidates):  # newest first, each once
        loaded = registry.load(version)
        why = trust.refusal(loaded) if trust is not None else None
        if why is None:
            return loaded
        reasons.append(f"v{version}: {why}")
        if len(reasons) >= 20:  # a long history of refusals says enough
            break
    raise UntrustedChampion(
        f"no champion of {registry.name} carries a trusted promotion signature "
        f"({'; '.join(reasons)}); sign one with `flywheel models promote VERSION` where "
        "FLYWHEEL_SIGNING_KEY is, or check FLYWHEEL_TRUSTED_KEYS (docs/security.md)"
    )
