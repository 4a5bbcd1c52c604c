"""The registry follower holds the live roles too (issue 28): each alias a role names is
loaded and checked as the champion is, on the same checks; a role whose alias is gone is
unloaded; champion and roles change as one snapshot. With a fake registry."""

from __future__ import annotations

from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import LoadedVersion
from flywheel.service import ModelFollower, ModelHolder, ServedModel
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])


class RolesRegistry:
    """Aliases (champion, shadow, canary, guard) read in one call, as `Registry.roles()`."""

    def __init__(self, **aliases: str) -> None:
        self.aliases = dict(aliases)
        self.loads: list[str] = []
        self.broken: set[str] = set()
        self.specs: dict[str, ModelSpec] = {}

    def roles(self) -> dict[str, str]:
        return dict(self.aliases)

    def champion_version(self) -> str | None:
        return self.aliases.get("champion")

    def load(self, version: str) -> LoadedVersion:
        self.loads.append(version)
        if version in self.broken:
            raise OSError(f"artifact of v{version} unreadable")
        spec = self.specs.get(version, SPEC)
        return LoadedVersion("m", version, spec, build_model(spec))


class Trust:
    """Refuses the versions in `untrusted` (as `PromotionTrust.refusal` does)."""

    def __init__(self, *untrusted: str) -> None:
        self.untrusted = set(untrusted)
        self.asked: list[str] = []

    def refusal(self, loaded: LoadedVersion) -> str | None:
        self.asked.append(loaded.version)
        return "no signature" if loaded.version in self.untrusted else None


def follower(tmp_path, registry: RolesRegistry, holder: ModelHolder, trust=None) -> ModelFollower:
    settings = Settings(home=tmp_path, model_name="m", registry_poll_s=60.0)
    return ModelFollower(
        settings.kafka,
        settings.registry,
        settings.service,
        holder,
        registry=lambda: registry,
        listen=False,
        trust=trust,
    )


def serving(version: str) -> ModelHolder:
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", version, SPEC, build_model(SPEC)))
    return holder


def held(holder: ModelHolder) -> dict[str, str]:
    s = holder.served_set()
    return {"champion": s.champion.version} | {r: m.version for r, m in s.roles().items()}


def test_each_role_is_loaded_verified_once_and_unloaded_when_its_alias_goes(tmp_path):
    reg = RolesRegistry(champion="1", shadow="2", canary="3")
    holder, trust = serving("1"), Trust()
    f = follower(tmp_path, reg, holder, trust)
    first = holder.served_set()
    assert f.check() is None  # the champion did not change
    assert held(holder) == {"champion": "1", "shadow": "2", "canary": "3"}
    assert sorted(reg.loads) == ["2", "3"] and sorted(trust.asked) == ["2", "3"]
    assert first.plain  # a snapshot taken before is never changed under its request
    assert f.check() is None and sorted(reg.loads) == ["2", "3"]  # nothing reloaded
    before = holder.served_set()
    reg.aliases["guard"] = "4"
    del reg.aliases["canary"]
    f.check()
    assert held(holder) == {"champion": "1", "shadow": "2", "guard": "4"}
    assert holder.served_set().shadow is before.shadow  # kept, not reloaded
    assert (f.stats.roles_loaded, f.stats.roles_unloaded) == (3, 1)


def test_a_promoted_canary_leaves_its_role_and_a_role_naming_the_champion_is_not_loaded(tmp_path):
    reg = RolesRegistry(champion="1", canary="2", guard="1")  # guard = champion: pointless
    holder = serving("1")
    f = follower(tmp_path, reg, holder)
    f.check()
    assert held(holder) == {"champion": "1", "canary": "2"} and reg.loads == ["2"]
    reg.aliases = {"champion": "2", "canary": "2", "guard": "1"}  # promoted, guard set
    assert f.check() == "2"
    assert held(holder) == {"champion": "2", "guard": "1"}
    assert f.stats.swaps == 1


def test_an_untrusted_role_or_one_with_another_schema_is_refused_once(tmp_path, caplog):
    from flywheel.features import Feature, FeatureSchema

    other = ModelSpec(
        input_dim=3,
        hidden=[4],
        labels=["cat", "dog"],
        schema=FeatureSchema(
            label="pet",
            labels=["cat", "dog"],
            features=[Feature(name=n, kind="numeric") for n in ("a", "b", "c")],
        ),
    )
    reg = RolesRegistry(champion="1", shadow="2", canary="3")
    reg.specs["3"] = other
    holder, trust = serving("1"), Trust("2")
    f = follower(tmp_path, reg, holder, trust)
    with caplog.at_level("ERROR"):
        f.check()
        f.check()
    assert held(holder) == {"champion": "1"}
    assert sorted(reg.loads) == ["2", "3"]  # each tried once, not at every check
    assert f.stats.refused == 2
    refusals = [r.getMessage() for r in caplog.records if "as the" in r.getMessage()]
    assert len(refusals) == 2 and any("feature schema" in m for m in refusals)
    reg.aliases["shadow"] = "4"  # another version takes the role: it is tried
    f.check()
    assert held(holder) == {"champion": "1", "shadow": "4"}


def test_a_role_that_fails_to_load_is_retried_and_the_old_one_dropped(tmp_path):
    reg = RolesRegistry(champion="1", shadow="2")
    holder = serving("1")
    f = follower(tmp_path, reg, holder)
    f.check()
    reg.aliases["shadow"] = "3"
    reg.broken.add("3")
    f.check()
    # the alias moved: v2 is no longer the shadow, and v3 is not loaded yet
    assert held(holder) == {"champion": "1"} and f.stats.failures == 1
    reg.broken.clear()
    f.check()  # the next poll tries again
    assert held(holder) == {"champion": "1", "shadow": "3"}


def test_a_plain_champion_source_is_followed_for_its_champion_only(tmp_path):
    class ChampionOnly:
        def __init__(self) -> None:
            self.champion = "2"

        def champion_version(self) -> str:
            return self.champion

        def load(self, version: str) -> LoadedVersion:
            return LoadedVersion("m", version, SPEC, build_model(SPEC))

    holder = serving("1")
    f = follower(tmp_path, ChampionOnly(), holder)  # type: ignore[arg-type]
    assert f.check() == "2" and held(holder) == {"champion": "2"}


def test_a_role_of_another_input_width_is_refused(tmp_path):
    reg = RolesRegistry(champion="1", shadow="2")
    reg.specs["2"] = ModelSpec(input_dim=4, hidden=[4], labels=["cat", "dog"])
    holder = serving("1")
    f = follower(tmp_path, reg, holder)
    f.check()
    assert held(holder) == {"champion": "1"} and f.stats.refused == 1
    assert "reads 4 inputs, the champion 3" in (f.stats.last_error or "")


def test_an_answer_without_a_champion_keeps_the_roles(tmp_path):
    """`Registry.roles()` reads a failed MLflow call as no aliases: that must not unload
    the shadow and the canary during a registry outage."""
    reg = RolesRegistry(champion="1", shadow="2", canary="3")
    holder = serving("1")
    f = follower(tmp_path, reg, holder)
    f.check()
    reg.aliases = {}
    f.check()
    assert held(holder) == {"champion": "1", "shadow": "2", "canary": "3"}
    reg.aliases = {"champion": "1", "canary": "3"}  # back, the shadow gone meanwhile
    f.check()
    assert held(holder) == {"champion": "1", "canary": "3"}
