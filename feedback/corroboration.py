"""Releasing quarantined corrections once other corrections corroborate them.

A correction that contradicts a confident model *and* its labelled neighbourhood is held
out of training (split `quarantine`). After a real concept change every early correction
looks like that, so quarantine must not be forever: once enough other corrections close
by carry the same label, the quarantined one is released to its normal split. The rule
reads only what is in the store, so every worker, and a replay after a crash, agrees.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Row, Text, cast, func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from flywheel.feedback.analyzer import assign_split
from flywheel.feedback.reference import ReferenceStats
from flywheel.store import ErrorType, Example, Origin, Split

MIN_SUPPORT = 3
RADIUS = 1.5  # standardized units, as the analyzer's neighbour radius
SUPPORT_POOL = 20_000
_BLOCK_CELLS = 2_000_000  # held rows x pool cells per distance block (16 MB of float64)


class Corroborator:
    """`release_corroborated` for a long-lived worker, which sweeps every few seconds.

    Reading the support pool costs ~0.1-0.5 s (20,000 rows), so a worker checks at most
    every `every_s` (a quarantined correction can wait a little; the sweep when a worker
    stops always checks), and a check with the same quarantined examples and no new
    correction since the last one stops after two small queries: support only grows with
    new corrections. The pool is read as JSON text and parsed in one call.
    """

    def __init__(
        self,
        reference: ReferenceStats,
        holdout_fraction: float,
        *,
        min_support: int = MIN_SUPPORT,
        radius: float = RADIUS,
        limit: int = 2000,
        every_s: float = 0.0,
    ) -> None:
        self.reference, self.holdout_fraction = reference, holdout_fraction
        self.min_support, self.radius, self.limit = min_support, radius, limit
        self.every_s = every_s
        self._seen: tuple[int | None, tuple[int, ...]] | None = None
        self._next = 0.0

    def __call__(self, session: Session, force: bool = False) -> int:
        """Release what is corroborated now; at most once per `every_s` unless `force`."""
        if not force and time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + self.every_s
        held = session.execute(
            select(Example.id, Example.features, Example.label, Example.parent_prediction_id)
            .where(
                Example.split == Split.QUARANTINE.value,
                Example.origin == Origin.CORRECTION.value,
                Example.error_type == ErrorType.SUSPECT.value,
            )
            .order_by(Example.id)
            .limit(self.limit)
        ).all()
        if not held:
            return 0
        newest = session.scalar(
            select(func.max(Example.id)).where(Example.origin == Origin.CORRECTION.value)
        )
        state = (newest, tuple(r[0] for r in held))
        if state == self._seen:
            return 0
        support = session.execute(
            select(cast(Example.features, Text), Example.label, Example.parent_prediction_id)
            .where(Example.origin == Origin.CORRECTION.value)
            .order_by(Example.id.desc())
            .limit(SUPPORT_POOL)
        ).all()
        xs = np.asarray(orjson.loads("[" + ",".join(r[0] for r in support) + "]"), dtype=np.float64)
        labels = np.asarray([r[1] for r in support])
        parents = np.asarray([r[2] for r in support])
        to: dict[str, list[int]] = {}  # released to which split
        for ex_id, parent in self._corroborated(held, xs, labels, parents):
            to.setdefault(assign_split(parent, self.holdout_fraction), []).append(ex_id)
        released = 0
        for split, ids in to.items():
            result = session.execute(
                update(Example)
                .where(Example.id.in_(ids), Example.split == Split.QUARANTINE.value)
                .values(split=split)
            )
            assert isinstance(result, CursorResult)  # an UPDATE's (typed as Result)
            released += result.rowcount or 0
        # the rows released now leave `held`: the next sweep's state differs and re-checks
        self._seen = state if not released else None
        return released

    def _corroborated(
        self,
        held: Sequence[Row[*tuple[Any, ...]]],
        xs: np.ndarray,
        labels: np.ndarray,
        parents: np.ndarray,
    ) -> list[tuple[int, str]]:
        """(id, parent) of the held examples with enough support. Distances are taken
        to the pool rows of the same label only, a block of held rows at a time, element
        for element the arithmetic of one row at a time (the same borderline cases pass)."""
        out = []
        std = self.reference.std
        by_label: dict[str, list] = {}
        for row in held:
            by_label.setdefault(row[2], []).append(row)
        for label, rows in by_label.items():
            same = labels == label
            pool, pool_parents = xs[same], parents[same]
            block = max(1, _BLOCK_CELLS // max(1, pool.size))
            for start in range(0, len(rows), block):
                chunk = rows[start : start + block]
                h = np.asarray([r[1] for r in chunk], dtype=np.float64)
                if self.reference.categorical:  # a differing code counts 1 (pair_distance)
                    dist = self.reference.pair_distance(pool[None, :, :], h[:, None, :])
                else:
                    dist = np.linalg.norm((pool[None, :, :] - h[:, None, :]) / std, axis=2)
                near = dist <= self.radius
                for (ex_id, _, _, parent), close in zip(chunk, near, strict=True):
                    agree = int(close.sum())
                    if agree >= self.min_support:  # not counting its own prediction's
                        agree -= int((close & (pool_parents == parent)).sum())
                    if agree >= self.min_support:
                        out.append((ex_id, parent))
        return out


def release_corroborated(
    session: Session,
    reference: ReferenceStats,
    holdout_fraction: float,
    *,
    min_support: int = MIN_SUPPORT,
    radius: float = RADIUS,
    limit: int = 2000,
) -> int:
    """Release the quarantined corrections that enough close, agreeing corrections (from
    other predictions) corroborate; returns how many."""
    return Corroborator(
        reference, holdout_fraction, min_support=min_support, radius=radius, limit=limit
    )(session)
