"""What the type checker must refuse, checked by `make typecheck` (so by CI).

Each marked line is a mistake mypy has to report: its `# type: ignore[code]` expects that
error, and with `warn_unused_ignores` a line mypy stopped refusing fails the check. The
unmarked lines are the right way, which must pass. Never run, only type-checked.
"""

from flywheel.learner import TrainerConfig
from flywheel.registry import Registry, parse_version
from flywheel.settings import Settings
from flywheel.store import seed_data


def a_component_takes_its_own_settings_group(settings: Settings) -> None:
    TrainerConfig.from_settings(settings.learner)
    TrainerConfig.from_settings(settings.feedback)  # type: ignore[arg-type]
    TrainerConfig.from_settings(settings)  # type: ignore[arg-type]
    seed_data(settings.trusted)
    seed_data(settings.learner)  # type: ignore[arg-type]


def a_version_number_is_not_any_string(registry: Registry, text: str) -> None:
    registry.load(parse_version(text))
    registry.load(text)  # type: ignore[arg-type]
    registry.set_champion("3")  # type: ignore[arg-type]
    registry.promote(registry.name, reason="", actor="")  # type: ignore[arg-type]
