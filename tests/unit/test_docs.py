"""The docs are part of the contract: they must name every setting the code accepts."""

from pathlib import Path

from flywheel.settings import known_variables

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented():
    text = (ROOT / "docs" / "contracts.md").read_text()
    missing = sorted(v for v in known_variables() if f"`{v}`" not in text)
    assert not missing, f"document these in docs/contracts.md: {missing}"


def test_readme_starts_with_what_flywheel_is_and_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("# Flywheel\n\nFlywheel is an online-learning inference service")
    setup = text.split("## Set up", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
