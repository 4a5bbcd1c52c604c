"""Which versions an erasure lists for the operator: those trained without DP whose
example range (the learner's `examples` tag, `ids A..B`) reaches the subject's first
example; DP versions, versions before the subject's data and versions not trained on the
store's traffic (no range) are not listed."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.store import non_dp_versions


@dataclass
class V:
    version: str
    tags: dict[str, str]


VERSIONS = [
    V("1", {"source": "seed"}),  # the seed model: the trusted set only
    V("2", {"examples": "ids 1..99 (99 new, update 1)", "epsilon": "none"}),
    V("3", {"examples": "ids 50..150 (100 new, update 2)", "epsilon": "none"}),
    V("4", {"examples": "ids 151..250 (100 new, update 3)", "epsilon": "1.2000"}),
    V("10", {"examples": "ids 251..300 (50 new, update 4)", "epsilon": "none"}),
    V("5", {"examples": "garbled", "epsilon": "none"}),
]


def test_lists_non_dp_versions_whose_range_reaches_the_first_example() -> None:
    assert non_dp_versions(VERSIONS, 120) == ["3", "10"]  # oldest first, by number
    assert non_dp_versions(VERSIONS, 99) == ["2", "3", "10"]  # the range's end is inclusive
    assert non_dp_versions(VERSIONS, 301) == []
    assert non_dp_versions(VERSIONS, None) == []  # the subject had no example
