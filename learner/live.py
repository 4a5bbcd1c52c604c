"""Live sequential decisions (issue 28): promote, retire or roll back on paired traffic.

Each `LiveJudge.step()` reads the registry's roles and, for each pair of versions that
scored the same labelled predictions -- the shadow against the champion, the canary
against the champion, the champion against the guard (the champion it replaced) --
builds a `flywheel.sequential.PairedTest` from the outcomes counted since the pair began
(`flywheel.store.paired_counts`, labelled at or after the later of the role's `<role>_at`
tag and the champion's `promoted_at`). The role holder is always the test's "candidate"
side, so one reading covers all three pairs:

- shadow or canary better: `promoted` (its role ends; with `live_guard` the champion it
  replaces becomes the guard); champion better: `retired` (the role ends);
- guard better: `rolled_back` (the guard is champion again and its role ends); champion
  better: `confirmed` (the guard role ends).

A rollback is announced as a `ModelEvent` of kind `rolled_back` (version = the guard,
previous = the champion it replaces): the alias moved back to a version that was champion
before. It goes through `Registry.rollback` when the guard is the champion before the
current one in the champion history (the usual case: the history then forgets the bad
version, as `flywheel models rollback` would), and else through a promotion of the guard
signed on the live evidence (an operator named another guard by hand).

With `auto_promote` off (or `act=False`) the verdict is recorded and nothing moves. Every
decision is recorded on the role holder's version as tags `live_decision` (the action)
and `live_evidence` (JSON: the test's `evidence()`, the counts, the mean log-loss
difference, the pair and since when) and published as a `ModelEvent` of kind
`live_decision`; the `pair` key in the evidence makes a decided pair be decided only once.
A verdict recorded but not acted on (`held`) is acted on at a later step that may act.

Why a sequential test and not the gate's fixed holdout: the judge reads the counts every
`live_judge_interval_s` for as long as the pair lasts; a fixed-sample test read that
often decides an A/A pair far more often than its α. `bench canary` measures the labels
each needs (docs/benchmarks.md).

>>> from flywheel.store import PairedCounts
>>> verdict = judge_counts("guard", PairedCounts(labels=400, a_only=60, b_only=20), 0.05)
>>> verdict.decision, verdict.would
('candidate', 'rolled_back')
>>> judge_counts("shadow", PairedCounts(labels=40, a_only=3, b_only=2), 0.05).action
'none'
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from flywheel.events import ModelEvent, utcnow
from flywheel.registry import ModelVersion, Registry
from flywheel.sequential import Decision, PairedTest
from flywheel.settings import (
    CANARY_ALIAS,
    CHAMPION_ALIAS,
    GUARD_ALIAS,
    SHADOW_ALIAS,
    GateSettings,
    KafkaSettings,
)
from flywheel.store import PairedCounts, paired_counts

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

__all__ = ["JUDGED_ROLES", "LiveJudge", "LiveVerdict", "judge_counts"]

JUDGED_ROLES = (GUARD_ALIAS, CANARY_ALIAS, SHADOW_ALIAS)  # the guard first: a bad champion
DECISION_TAG, EVIDENCE_TAG = "live_decision", "live_evidence"
ACTED = ("promoted", "retired", "rolled_back", "confirmed")
_ACTIONS: dict[tuple[bool, Decision], str] = {
    (False, "candidate"): "promoted",
    (False, "champion"): "retired",
    (True, "candidate"): "rolled_back",
    (True, "champion"): "confirmed",
}


@dataclass(frozen=True)
class LiveVerdict:
    """One pair's reading: counts, evidence, what the test says and what was done.

    `action`: `none` (undecided), `held` (decided, not acted on: auto-promote off or a
    read-only look), `already` (decided at an earlier step), or what was done
    (`promoted`, `retired`, `rolled_back`, `confirmed`); `would` is what a decided verdict
    calls for, whether or not it was done.

    >>> v = judge_counts("canary", PairedCounts(labels=500, a_only=10, b_only=45), 0.05)
    >>> v.decision, v.would, v.evidence["decision"]
    ('champion', 'retired', 'champion')
    """

    role: str
    version: ModelVersion | None  # the role holder (None: a bare reading of counts)
    champion: ModelVersion | None
    since: datetime | None
    counts: PairedCounts
    evidence: dict[str, Any]
    decision: Decision | None
    would: str | None
    action: str = "none"

    @property
    def pair(self) -> str:
        """What identifies the pair: a verdict recorded under another key is not this one's."""
        since = self.since.isoformat() if self.since is not None else "-"
        return f"{self.role}:v{self.version}-v{self.champion}:{since}"

    def as_dict(self) -> dict[str, Any]:
        """Plain data (`flywheel models judge --json`, the model event)."""
        return {
            "role": self.role,
            "version": self.version,
            "champion": self.champion,
            "since": self.since.isoformat() if self.since is not None else None,
            "decision": self.decision,
            "would": self.would,
            "action": self.action,
            "evidence": self.evidence,
        }


def judge_counts(
    role: str,
    counts: PairedCounts,
    alpha: float,
    *,
    version: ModelVersion | None = None,
    champion: ModelVersion | None = None,
    since: datetime | None = None,
) -> LiveVerdict:
    """The verdict on `counts` (`paired_counts(role holder, champion)`): the role holder is
    the test's candidate, so "candidate" means the shadow or canary is better, or for the
    guard that the champion it replaced was better (roll back)."""
    if role not in JUDGED_ROLES:
        raise ValueError(f"role must be one of {JUDGED_ROLES}, got {role!r}")
    test = PairedTest(
        alpha=alpha, candidate_wins=counts.a_only, champion_wins=counts.b_only, labels=counts.labels
    )
    decision = test.decision
    n = counts.labels
    evidence: dict[str, Any] = {
        **test.evidence(),
        "role": role,
        "version": version,
        "champion": champion,
        "both_right": counts.both,
        "neither_right": counts.neither,
        # mean log-loss of the role holder minus the champion's on the paired labels
        "log_loss_difference": (counts.a_log_loss - counts.b_log_loss) / n if n else 0.0,
        "since": since.isoformat() if since is not None else None,
    }
    would = None if decision is None else _ACTIONS[(role == GUARD_ALIAS, decision)]
    verdict = LiveVerdict(role, version, champion, since, counts, evidence, decision, would)
    verdict.evidence["pair"] = verdict.pair
    return verdict


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        log.warning("ignoring a role time that is not ISO 8601: %r", text)
        return None


class LiveJudge:
    """Decides each live pair with an always-valid test; acts when auto-promotion is on.

    `engine`: the training store (outcomes); `before_write`: called right before each
    registry write (the learner passes its lease check, so a learner that lost its lease
    moves nothing); `notify=False` sends no model events (tests, the bench).

    What a step does with one pair's counts (the judge reads them from the store):

    >>> judge_counts("shadow", PairedCounts(labels=300, a_only=50, b_only=10), 0.05).would
    'promoted'
    """

    def __init__(
        self,
        gate: GateSettings,
        kafka: KafkaSettings,
        registry: Registry,
        engine: Engine,
        *,
        actor: str = "flywheel-judge",
        before_write: Callable[[], object] | None = None,
        notify: bool = True,
    ) -> None:
        self.gate = gate
        self.kafka = kafka
        self.registry = registry
        self.engine = engine
        self.actor = actor
        self.before_write = before_write
        self.notify = notify

    @property
    def alpha(self) -> float:
        return self.gate.live_alpha

    # ---- reading ----------------------------------------------------------------------------
    def verdicts(self) -> list[LiveVerdict]:
        """Every current pair's verdict, read only (nothing recorded, nothing moved)."""
        from sqlalchemy.orm import Session

        roles = self.registry.roles()
        champion = roles.get(CHAMPION_ALIAS)
        if champion is None:
            return []
        out = []
        champion_tags = self._tags(champion)
        with Session(self.engine) as session:
            for role in JUDGED_ROLES:
                version = roles.get(role)
                if version is None or version == champion:
                    continue
                tags = self._tags(version)
                since = max(
                    (
                        t
                        for t in (
                            _parse_time(tags.get(f"{role}_at")),
                            _parse_time(champion_tags.get("promoted_at")),
                        )
                        if t is not None
                    ),
                    default=None,
                )
                counts = paired_counts(session, self.registry.name, version, champion, since=since)
                verdict = judge_counts(
                    role, counts, self.alpha, version=version, champion=champion, since=since
                )
                recorded = _recorded(tags)
                if (
                    verdict.decision is not None
                    and recorded is not None
                    and recorded.get("pair") == verdict.pair
                ):
                    verdict = replace(verdict, action=str(tags.get(DECISION_TAG, "already")))
                out.append(verdict)
        return out

    def _tags(self, version: ModelVersion) -> dict[str, str]:
        return self.registry.info(version, with_run=False).tags

    # ---- deciding ---------------------------------------------------------------------------
    def step(self, *, act: bool | None = None) -> list[LiveVerdict]:
        """Read every pair, record each new decision and act on it when allowed.

        `act`: None follows `auto_promote`; False only records; True acts only if
        `auto_promote` is on as well (an operator's switch is never overridden). After a
        move of the champion the remaining pairs wait for the next step (they now pair
        with another champion)."""
        may_act = self.gate.auto_promote and (act is None or act)
        out = []
        moved = False
        for verdict in self.verdicts():
            if verdict.decision is None or moved:
                out.append(verdict)
                continue
            if verdict.action in ACTED or (verdict.action == "held" and not may_act):
                out.append(replace(verdict, action="already"))
                continue
            if may_act:
                done = self._act(verdict)
                moved = done in ("promoted", "rolled_back")
            else:
                done = "held"
            verdict = replace(verdict, action=done)
            self._record(verdict)
            out.append(verdict)
        return out

    def _record(self, verdict: LiveVerdict) -> None:
        assert verdict.version is not None
        self._check()
        evidence = {**verdict.evidence, "action": verdict.action}
        self.registry.set_tags(
            verdict.version,
            {DECISION_TAG: verdict.action, EVIDENCE_TAG: json.dumps(evidence, default=str)},
        )
        if verdict.role == GUARD_ALIAS and verdict.champion is not None:
            # the guard pair judges the champion: its version says so as well
            self.registry.set_tags(
                verdict.champion,
                {DECISION_TAG: verdict.action, EVIDENCE_TAG: json.dumps(evidence, default=str)},
            )
        self._announce(
            ModelEvent(
                kind="live_decision",
                model_name=self.registry.name,
                version=verdict.version,
                previous_version=verdict.champion,
                reason=self._reason(verdict),
                actor=self.actor,
                timestamp=utcnow(),
                role=verdict.role,
                evidence=json.loads(json.dumps(evidence, default=str)),
            )
        )
        log.info("%s", self._reason(verdict))

    def _reason(self, v: LiveVerdict) -> str:
        e = v.evidence
        return (
            f"live {v.role} v{v.version} vs champion v{v.champion}: {v.decision} better "
            f"({e['candidate_only_right']} vs {e['champion_only_right']} discordant of "
            f"{e['labels']} paired labels, accuracy difference {e['accuracy_difference']:+.4f}, "
            f"log-evidence {e['log_evidence']:.2f} >= {e['threshold']:.2f}, alpha {e['alpha']}) "
            f"-> {v.action}"
        )

    def _act(self, v: LiveVerdict) -> str:
        from flywheel.promotion import promote, rollback

        assert v.version is not None and v.champion is not None and v.would is not None
        reason = self._reason(replace(v, action=v.would))
        gate = f"passed: {reason}"[:1000]  # the signed basis of the move
        self._check()
        if v.would == "promoted":
            promote(
                self.kafka,
                v.version,
                reason=reason,
                registry=self.registry,
                actor=self.actor,
                notify=self.notify,
                gate=gate,
                guard=self.gate.live_guard,
            )
            if self.registry.role_version(v.role) == v.version:
                self._clear(v.role, reason)
        elif v.would == "rolled_back":
            history = self.registry.champion_history()
            if len(history) >= 2 and history[-1] == v.champion and history[-2] == v.version:
                rollback(
                    self.kafka,
                    reason=reason,
                    registry=self.registry,
                    actor=self.actor,
                    notify=self.notify,
                )
            else:  # the guard is not the previous champion: promote it, signed on the test
                event = promote(
                    self.kafka,
                    v.version,
                    reason=reason,
                    registry=self.registry,
                    actor=self.actor,
                    notify=False,
                    gate=gate,
                )
                self.registry.set_tags(
                    v.champion,
                    {
                        "rolled_back_at": utcnow().isoformat(timespec="milliseconds"),
                        "rolled_back_by": self.actor,
                        "rollback_reason": reason,
                    },
                )
                self._announce(event.model_copy(update={"kind": "rolled_back"}))
            self._clear(GUARD_ALIAS, reason)
        else:  # retired, confirmed: the role ends
            self._clear(v.role, reason)
        return v.would

    def _clear(self, role: str, reason: str) -> None:
        self._check()
        was = self.registry.clear_role(role, reason=reason, actor=self.actor)
        if was is not None:
            self._announce(
                ModelEvent(
                    kind="role_changed",
                    model_name=self.registry.name,
                    version="none",
                    previous_version=was,
                    reason=reason,
                    actor=self.actor,
                    timestamp=utcnow(),
                    role=role,
                )
            )

    def _check(self) -> None:
        if self.before_write is not None:
            self.before_write()

    def _announce(self, event: ModelEvent) -> None:
        if self.notify:
            from flywheel.promotion import announce

            announce(self.kafka, event)


def _recorded(tags: dict[str, str]) -> dict[str, Any] | None:
    raw = tags.get(EVIDENCE_TAG)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
