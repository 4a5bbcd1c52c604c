"""The docs are part of the contract: they must name every setting the code accepts."""

import re
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


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Layout\n", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_names_only_paths_that_exist():
    named = re.findall(r"`([\w./-]+(?:/|\.py))`", _layout())
    assert named, "the Layout section names no folder"
    missing = []
    for path in named:
        # a bare file name is inside flywheel/ or flywheel/store/, as the text says
        candidates = [ROOT / path, ROOT / "flywheel" / path, ROOT / "flywheel" / "store" / path]
        if not any(c.exists() for c in candidates):
            missing.append(path)
    assert not missing, f"README's Layout names paths not in the tree: {missing}"


def test_readme_layout_names_every_package_folder():
    layout = _layout()
    folders = [p.parent for p in ROOT.glob("*/__init__.py")] + [
        p.parent for p in (ROOT / "flywheel").glob("*/__init__.py")
    ]
    folders += [ROOT / "docker", ROOT / "docs"]
    unnamed = sorted(
        str(f.relative_to(ROOT)) + "/"
        for f in folders
        if f"`{f.relative_to(ROOT)}/`" not in layout and f.name != "tests"
    )
    assert not unnamed, f"README's Layout leaves out: {unnamed}"


def test_contracts_lists_each_setting_under_its_group():
    from flywheel.settings import ENV_PREFIX, GROUPS

    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Settings\n", 1)[1].split("\n## ", 1)[0]
    for name, group in GROUPS.items():
        assert f"### `{name}`" in section, f"docs/contracts.md has no `{name}` group"
        listed = section.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        documented = set(re.findall(r"^\| `(FLYWHEEL_[A-Z0-9_]+)`", listed, re.M))
        expected = {ENV_PREFIX + field.upper() for field in group.model_fields}
        assert documented == expected, f"group `{name}` in docs/contracts.md"


def test_docs_map_names_only_paths_that_exist():
    text = (ROOT / "docs" / "README.md").read_text()
    where = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+/[\w./]*|[\w]+\.py)`", where))
    assert len(named) > 20
    folders = [
        ROOT,
        ROOT / "flywheel",
        ROOT / "service",
        ROOT / "service" / "routes",
        ROOT / "feedback",
        ROOT / "learner",
        ROOT / "flywheel" / "store",
        ROOT / "flywheel" / "review",
        ROOT / "flywheel" / "demo",
        ROOT / "flywheel" / "client",
        ROOT / "privacy",
    ]
    missing = sorted(n for n in named if not any((f / n).exists() for f in folders))
    assert not missing, f"docs/README.md's map names paths not in the tree: {missing}"
