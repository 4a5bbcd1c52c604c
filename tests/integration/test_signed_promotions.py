"""Signed promotions on real parts (issue 26, part 5): a SQLite MLflow store, the production
app under uvicorn with its registry follower. A version registered and aliased by hand in
MLflow, or one whose artifact was replaced after signing, is never served; the follower
keeps the current model, logs why and counts it in /metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from flywheel.learner import default_spec
from flywheel.modelspec import build_model
from flywheel.registry import Registry
from flywheel.settings import CHAMPION_ALIAS, Settings
from flywheel.signing import PAYLOAD_TAG, SIGNATURE_TAG

from .test_hot_swap import SWAP_S, TAGS, publish_variant, served_version, serving, wait_for

pytestmark = pytest.mark.integration


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


@pytest.fixture()
def fast(settings: Settings) -> Settings:
    """Poll the registry often: these tests move the alias by hand, with no model event."""
    return settings.model_copy(update={"registry_poll_s": 0.3})


@pytest.fixture()
def registry(fast: Settings) -> Registry:
    reg = Registry.of(fast)
    torch.manual_seed(0)
    spec = default_spec()
    reg.set_champion(reg.publish(spec, build_model(spec), tags={"parent_version": "", **TAGS}))
    return reg


def test_a_version_aliased_by_hand_is_refused_and_a_signed_one_still_swaps_in(fast, registry):
    v1 = registry.champion_version()
    assert v1 is not None
    by_hand = publish_variant(registry, v1, seed=1)  # registered, never signed
    signed = publish_variant(registry, v1, seed=2)
    with serving(fast) as svc:
        assert served_version(svc.url) == v1
        assert metric(svc.url, "flywheel_model_untrusted_total") == 0
        # what an attacker with MLflow access does: the alias moved in MLflow directly
        registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, by_hand)
        assert wait_for(lambda: svc.follower.stats.refused >= 1, SWAP_S), "never checked"
        checks = svc.follower.stats.checks
        assert wait_for(lambda: svc.follower.stats.checks >= checks + 3, SWAP_S)
        assert served_version(svc.url) == v1
        assert metric(svc.url, "flywheel_model_untrusted_total") == 1  # once per version
        assert "no promotion signature" in (svc.follower.stats.last_error or "")
        assert svc.follower.stats.swaps == 0

        # a signature copied from another version names that version, not this one
        forged = publish_variant(registry, v1, seed=3)
        tags = registry.info(v1, with_run=False).tags
        registry.set_tags(forged, {k: tags[k] for k in (PAYLOAD_TAG, SIGNATURE_TAG)})
        registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, forged)
        assert wait_for(lambda: svc.follower.stats.refused >= 2, SWAP_S)
        assert f"not {registry.name} v{forged}" in (svc.follower.stats.last_error or "")
        assert served_version(svc.url) == v1

        # the trusted path still works: a promotion signs, the follower swaps
        registry.promote(signed, reason="reviewed", actor="pytest")
        assert wait_for(lambda: served_version(svc.url) == signed, SWAP_S)
        assert metric(svc.url, "flywheel_model_untrusted_total") == 2


def test_an_artifact_replaced_after_signing_is_refused(fast, registry):
    """The SHA-256 beside the weights proves nothing to someone who writes both; the signed
    statement names the digest of the artifact that was promoted."""
    v1 = registry.champion_version()
    assert v1 is not None
    v2 = publish_variant(registry, v1, seed=1)
    v3 = publish_variant(registry, v1, seed=2)
    with serving(fast) as svc:
        assert served_version(svc.url) == v1
        registry.promote(v2, reason="reviewed", actor="pytest")
        assert wait_for(lambda: served_version(svc.url) == v2, SWAP_S)
        # v3 signed, then its artifact overwritten with v1's (whoever writes MLflow's store)
        registry.sign(v3, gate="passed: test")
        source = Path(
            registry.client.get_model_version(registry.name, v3).source.removeprefix("file://")
        )
        other = Path(
            registry.client.get_model_version(registry.name, v1).source.removeprefix("file://")
        )
        for name in ("spec.json", "weights.pt"):  # a consistent pair: its own checksum holds
            shutil.copyfile(other / name, source / name)
        registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, v3)
        assert wait_for(lambda: svc.follower.stats.refused >= 1, SWAP_S)
        assert "is not the signed one" in (svc.follower.stats.last_error or "")
        assert served_version(svc.url) == v2


def test_start_up_serves_the_newest_trusted_champion(fast, registry):
    """A restart while a hand-aliased version is champion serves the last trusted one."""
    v1 = registry.champion_version()
    assert v1 is not None
    v2 = publish_variant(registry, v1, seed=1)
    registry.promote(v2, reason="reviewed", actor="pytest")
    by_hand = publish_variant(registry, v1, seed=2)
    registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, by_hand)
    with serving(fast) as svc:
        assert served_version(svc.url) == v2
        assert metric(svc.url, "flywheel_model_untrusted_total") == 1
