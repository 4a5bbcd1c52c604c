"""Every example in a docstring of the package runs and prints what it says.

A runnable example that nobody runs goes stale; this runs them all (`doctest`), module
by module, so a failure names the module.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.unit.test_layers import sources

MODULES = sorted(
    name
    for name in sources()
    if not name.endswith("__main__")
    and ".migrations.versions." not in name
    and name != "flywheel.migrations.env"
)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


def test_some_docstrings_have_examples():
    assert sum(len(_examples(name)) for name in MODULES) >= 5


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tests = _examples(name)
    if not tests:
        return
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) in {name} failed"
