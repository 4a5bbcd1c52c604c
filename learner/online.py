"""`flywheel learn`: the mini-batch online learner that closes the loop.

Each step reads new trainable examples past a durable cursor, runs one update per N of
them (several gradient steps, replay mixed in, elastic rate), gates the candidate against
the champion, registers it in MLflow and, if it passed and auto-promotion is on, moves
the `champion` alias and announces it. The cursor is saved after the version is
registered, and the version carries the cursor it was trained up to, so a learner that
dies between the two adopts that version on restart instead of training on the same
examples again.

One learner per lineage writes (learner/lease.py): every write (ledger entry, ledger
version, saved state) carries the lineage's lease and is refused with `LeaseLost` once a
newer learner holds it, and the lease is checked right before each write outside the
store (MLflow publish, alias move); a learner that lost it publishes nothing and goes back
to standby. A stop (SIGTERM) is checked between gradient steps: the step is abandoned,
nothing of it is published, and the lease is let go.

The same leased process runs the live judge (learner/live.py) every
FLYWHEEL_LIVE_JUDGE_INTERVAL_S between steps: shadow, canary and guard pairs decided on live
paired traffic, each move behind the same lease check.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from flywheel.learner.config import LearnerConfig
from flywheel.learner.cursor import CursorState
from flywheel.learner.evaluation import Holdout, holdout_of
from flywheel.learner.example_source import ExampleSource, StoredExample, as_arrays
from flywheel.learner.exclusion import STATE_KEY as EXCLUDED_STATE
from flywheel.learner.gate import GateResult, evaluate_gate
from flywheel.learner.lease import LeaseKeeper, StepAbandoned
from flywheel.learner.live import LiveJudge, LiveVerdict
from flywheel.learner.private_step import UNIT_WAIT_ROWS, PrivacyOutcome, PrivateStep, unit_prefix
from flywheel.learner.seed_model import ensure_champion
from flywheel.learner.trainer import OnlineTrainer, TrainerConfig
from flywheel.registry import ModelVersion, Registry, parse_version
from flywheel.retry import Backoff, DependencyStatus, Fatal, dependency_of, fatal_reason, transient
from flywheel.store import LeaseLost, TrustedData, positions, require_trusted

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_CANDIDATE = 10  # a backlog is trained per N but published once per step
LINEAGE_TAG, UPDATE_TAG, CURSOR_TAG = "learner_lineage", "learner_update", "learner_cursor"
LEDGER_TAG = "learner_ledger_row"  # the privacy ledger row the version is named on


@dataclass(frozen=True)
class Candidate:
    version: ModelVersion | None  # None: rejected and not registered (gate_register_failed)
    parent_version: ModelVersion
    gate: GateResult
    promoted: bool
    examples: int
    first_id: int
    last_id: int
    update: int
    lr: float
    privacy: dict[str, float | None] | None = None  # ε and the same run's accuracy without DP


@dataclass
class LearnerStats:
    candidates: int = 0
    promoted: int = 0
    examples: int = 0
    last: Candidate | None = None
    history: list[Candidate] = field(default_factory=list)


class OnlineLearner:
    """One learner per lineage; call `step()` in a loop or `run(stop)`."""

    def __init__(
        self,
        config: LearnerConfig,
        registry: Registry,
        *,
        source: ExampleSource | None = None,
        on_candidate: Callable[[Candidate], None] | None = None,
    ) -> None:
        """`config`: the settings groups it reads (`LearnerConfig.of(settings)` at the
        process's edge); `registry`: the process's one `Registry`, built there too."""
        from flywheel.store import open_store

        self.config = config
        self.registry = registry
        self.source = source or ExampleSource(open_store(config.state.resolved_database_url))
        self.lineage = f"{config.registry.model_name}:online"
        self.on_candidate = on_candidate
        self.stats = LearnerStats()
        self._state: dict = {}
        self._cursor = CursorState()
        self._trainer: OnlineTrainer | None = None
        self._working: ModelVersion | None = None
        self._champion_cache: tuple[ModelVersion, nn.Module] | None = None
        self._private: PrivateStep | None = None
        self._shadow: OnlineTrainer | None = None  # the same run without DP, for the gate
        self._started = False
        self.lease = LeaseKeeper(
            self.source.engine,
            self.lineage,
            ttl_s=config.learner.learn_lease_s,
            renew_s=config.learner.learn_lease_renew_s,
        )
        self.stop_event = threading.Event()  # set: the step in progress is abandoned
        # a failed step is retried with the shared backoff (flywheel.retry); the gauge
        # flywheel_dependency_up says which dependency it waits for
        self.dependencies = DependencyStatus(("store", "registry"))
        self._policy = Backoff.of(config.retry)
        self._failures = 0
        # live decisions (issue 28) run in the lineage's leased process, every
        # FLYWHEEL_LIVE_JUDGE_INTERVAL_S, and move nothing without the lease
        self.judge = LiveJudge(
            config.gate,
            config.kafka,
            registry,
            self.source.engine,
            actor="flywheel-learner",
            before_write=self._lease_check,
        )
        self._judged_at: float | None = None

    # ---- start and recovery -------------------------------------------------------------
    def start(self) -> None:
        """Load the cursor, adopt a version a crashed run registered, fill the replay pool.

        The trusted set (`flywheel init`, in the store) is the gate's trusted holdout, the
        novelty reference and, when it is public, replayed data. A trusted set that is not
        public is never replayed while privacy is on: not by DP updates (they may replay
        only data outside the privacy accounting) and not by the run without DP beside
        them, which must be the same run without noise. With privacy off
        (FLYWHEEL_PRIVACY_ENABLED=false) nothing is accounted and every update is plain
        SGD, so the trusted rows are replayed whatever `public` says. `NoTrustedData` when
        the lineage has none.

        Takes the lineage's lease first (the state is read under it), waiting as a standby
        up to twice FLYWHEEL_LEARN_LEASE_S for a holder that stopped renewing; LeaseLost if
        a live learner keeps it (`run` waits for as long as it takes instead).
        """
        from flywheel.feedback import ReferenceStats

        c = self.config
        if not self.lease.held:
            self.lease.drop()
            wait_s = 2 * c.learner.learn_lease_s + c.learner.learn_lease_renew_s
            if not self.lease.wait(self.stop_event, timeout_s=wait_s):
                holder = self.lease.table.holder(self.lineage)
                raise LeaseLost(
                    f"the lease of {self.lineage} is held by "
                    f"{holder.owner if holder else '?'}: one learner per lineage"
                )
        champion = ensure_champion(c.trusted, self.registry)
        self._state = self.source.load_state(self.lineage) or {}
        self._adopt_orphan()
        self._cursor = CursorState.from_dict(self._state.get("cursor"))
        champion = self.registry.champion_version() or champion
        saved = self._state.get("working_version")  # the learner's own state, as JSON text
        base = parse_version(saved) if saved else champion
        if self._state.get("champion_seen") not in (None, champion):
            base = champion  # promoted or rolled back by someone else: follow it
        loaded = self.registry.load(base)
        if loaded.spec.kind == "cascade":
            raise ValueError(
                f"v{base} is a cascade model; the online learner trains logistic, mlp, "
                "embed_mlp and factory specs, not cascades (docs/serving.md): promote "
                "another version first"
            )
        trainer_config = TrainerConfig.from_settings(c.learner)
        with self.source.sessions() as session:
            data = require_trusted(
                session, c.registry.model_name, max_train=trainer_config.reservoir
            )
        schema = data.info.schema
        if schema.input_dim != loaded.spec.input_dim:
            raise ValueError(
                f"v{base} reads {loaded.spec.input_dim} inputs, the trusted set of "
                f"{c.registry.model_name} has {schema.input_dim} ({schema.names})"
            )
        if loaded.spec.schema is not None and loaded.spec.schema != schema:
            log.warning(
                "v%s carries a schema (%s) other than its trusted set's (%s)",
                base,
                loaded.spec.schema.fingerprint(),
                schema.fingerprint(),
            )
        self._trusted = Holdout.of_names(
            data.x_holdout, [schema.labels[int(i)] for i in data.y_holdout], loaded.spec.labels
        )
        self._labels = loaded.spec.label_index()
        self._spec = loaded.spec
        x_tr, y_tr = self._trusted_train(data)
        replay_trusted = data.info.public or not c.privacy.privacy_enabled
        if not replay_trusted:
            log.info(
                "the trusted set of %s is not public: DP updates never replay it",
                c.registry.model_name,
            )
            x_tr, y_tr = x_tr[:0], y_tr[:0]
        trainer = OnlineTrainer(
            loaded.module,
            trainer_config,
            input_dim=loaded.spec.input_dim,
            seed=c.trusted.seed,
            novelty=ReferenceStats.from_examples(
                data.x_train.astype(np.float64),
                categorical=positions(schema, "categorical"),
                boolean=positions(schema, "boolean"),
            ),
        )
        trainer.elastic.restore(self._state.get("elastic", {}))
        trainer.remember_public(x_tr, y_tr)  # replayed after an error drift: the gate's data
        self._refill(trainer, x_tr, y_tr)
        if c.privacy.privacy_enabled:
            self._private = PrivateStep(
                c.privacy,
                c.learner.learn_steps,
                self.source.engine,
                self.lineage,
                window=c.learner.learn_boost_window,
            )
            self._private.excluded.restore(self._state.get(EXCLUDED_STATE))
            self._shadow = trainer
            # DP steps: their own base rate; a background line under DP-SGD only, trained
            # in the line's own steps (jointly clipped: no second use of any example)
            dp_config = trainer.config.private(
                c.privacy.privacy_learn_lr, c.privacy.privacy_mechanism
            )
            trainer = OnlineTrainer(
                loaded.module,
                dp_config,
                input_dim=loaded.spec.input_dim,
                seed=c.trusted.seed,
                novelty=trainer.novelty,
            )
            trainer.elastic.restore(self._state.get("elastic", {}))
            trainer.remember_public(x_tr, y_tr)
            self._resume_private(trainer)
            self._shadow.reset_module(copy.deepcopy(loaded.module))
            self._shadow.between_steps = self._between_steps
        trainer.between_steps = self._between_steps
        self._trainer, self._working = trainer, base
        self._started = True
        log.info(
            "learner %s resumes at update %d, watermark %d, from v%s",
            self.lineage,
            self._state.get("update", 0),
            self._cursor.watermark,
            base,
        )

    def _between_steps(self) -> None:
        """Between gradient steps (and before publishing): abandon the step on a stop or a
        lost lease; nothing of it has been published, its ledger entry keeps counting."""
        if self.stop_event.is_set():
            raise StepAbandoned(f"learner {self.lineage}: stop asked for during a step")
        if self.lease.lost.is_set():
            raise LeaseLost(f"learner {self.lineage}: lease lost during a step")

    def _trusted_train(self, data: TrustedData) -> tuple[np.ndarray, np.ndarray]:
        """The trusted training rows with labels as indices into the model's labels (rows
        whose label the model lacks are left out: it cannot be trained to output them)."""
        names = data.info.schema.labels
        y = np.asarray([self._labels.get(names[int(i)], -1) for i in data.y_train], np.int64)
        keep = y >= 0
        return data.x_train[keep], y[keep]

    def _refill(self, trainer: OnlineTrainer, x_seed: np.ndarray, y_seed: np.ndarray) -> None:
        """Refill the replay pool and the examples since the last change after a (re)start.

        After an error drift the pool holds only examples since it, as before the restart:
        older examples teach the concept that changed (the trusted rows, where they may be
        replayed at all, are replayed from their own pool, `remember_public`).
        """
        replay = self.source.replay_sample(self._cursor.highest, trainer.config.reservoir)
        replay_from = self._state.get("replay_from_id")
        if replay_from is not None and trainer.config.elastic and trainer.config.drift_replay:
            replay = [r for r in replay if r.id >= int(replay_from)]
            trainer.replay_reset = True
        elif len(replay) < 100 and len(y_seed):
            trainer.remember(x_seed, y_seed)
        if replay:
            trainer.remember(*as_arrays(replay, self._labels))
        window = trainer.config.boost_window
        if trainer.config.elastic and window and self._cursor.highest > 0:
            since = int(self._state.get("change_at_id", 0))
            recent = [
                r
                for r in self.source.newest_trainable(window)
                if since <= r.id <= self._cursor.highest
            ]
            if recent:
                trainer.remember_since_change(*as_arrays(recent, self._labels))

    def _resume_private(self, trainer: OnlineTrainer) -> None:
        """After a restart, the DP trainer's drift response as it was: the public replay
        cut after an error drift, and the private rows since the change to reuse."""
        assert self._private is not None
        replay_from = self._state.get("replay_from_id")
        trainer.replay_reset = replay_from is not None and trainer.config.drift_replay
        since = self._state.get("change_at_id")
        window = self._private.window.capacity
        if since is None or not window or self._cursor.highest <= 0:
            return
        rows = self.source.newest_trainable(window)
        self._private.resume(
            int(since), [r for r in rows if int(since) <= r.id <= self._cursor.highest]
        )

    def _adopt_orphan(self) -> None:
        """A version registered after the last saved state means we died before saving."""
        done = int(self._state.get("update", 0))
        for info in self.registry.versions():
            tags = info.tags
            if tags.get(LINEAGE_TAG) != self.lineage or int(tags.get(UPDATE_TAG, -1)) <= done:
                continue
            log.warning(
                "adopting v%s registered by a learner that stopped before saving its cursor",
                info.version,
            )
            self._state.update(
                update=int(tags[UPDATE_TAG]),
                working_version=info.version,
                cursor=json.loads(tags[CURSOR_TAG]),
            )
            if tags.get("epsilon", "none") != "none":
                row = tags.get(LEDGER_TAG)  # absent on versions published before 0009
                PrivateStep.adopt(
                    self.source.engine,
                    self.lineage,
                    int(tags[UPDATE_TAG]),
                    info.version,
                    int(row) if row else None,
                    fence=self.lease.fence(),
                )
            champion = self.registry.champion_version()
            if (
                self.config.gate.auto_promote
                and tags.get("gate", "").startswith("passed")
                and champion == tags.get("parent_version")
            ):
                # Not promoted (signed) on its tags: whoever can write MLflow can write a
                # version with these tags, and a signature would make it servable. A
                # reviewer approves it (flywheel models approve), as with auto-promote off.
                self.registry.set_tags(info.version, {"review": "pending"})
                log.warning(
                    "v%s passed its gate per its tags but was not promoted before the "
                    "learner stopped; left for review (its gate is not re-signed from tags)",
                    info.version,
                )
            self._state["champion_seen"] = champion
            self.source.save_state(
                self.lineage,
                self._state,
                CursorState.from_dict(self._state["cursor"]).watermark,
                fence=self.lease.fence(),
            )
            return

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> Candidate | None:
        """Train and publish one candidate if at least N new trainable examples are waiting."""
        if self._started:
            try:
                self.lease.fence().check()  # renews it: kept from step to step
            except LeaseLost:
                self.lease.drop()  # taken over: wait for it as a standby in start()
                self._started = False  # another learner may have written: read all again
        if not self._started:
            self.start()
        assert self._trainer is not None
        n = self.config.learner.learn_batch
        cursor = CursorState.from_dict(self._cursor.to_dict())
        rows = self.source.read_new(cursor, n * MAX_CHUNKS_PER_CANDIDATE * 4)
        released, forget = self.source.released(cursor)
        trainable = released + [r for r in rows if r.trainable]
        if self._private is not None and self.config.privacy.privacy_unit_batch:
            # a DP update waits for N privacy units, not N rows (docs/privacy.md)
            end = unit_prefix(trainable, n, UNIT_WAIT_ROWS * n, MAX_CHUNKS_PER_CANDIDATE)
        else:
            end = min(len(trainable) // n, MAX_CHUNKS_PER_CANDIDATE) * n
        if end == 0:
            return None
        used = trainable[:end]
        released_used = {r.id for r in used[: len(released)]}  # released come first
        new_ids = [r.id for r in used[len(released) :]]
        last_used = max(new_ids) if new_ids else -1
        passed_rows = [r for r in rows if r.id <= last_used]
        cursor.mark_read([r.id for r in passed_rows])
        # released-but-unused ids stay held, so the next step trains on them
        cursor.held = sorted(
            (set(cursor.held) - set(forget) - released_used)
            | {r.id for r in passed_rows if r.quarantined}
        )
        cursor.advance(self.config.learner.learn_cursor_grace_s)
        update = int(self._state.get("update", 0)) + 1
        privacy: PrivacyOutcome | None = None
        if self._private is not None:
            # the budget is checked before anything trains; a refusal leaves the model as is
            # while the boost after a change lasts, the private examples since it are
            # trained on again, as far as each one's budget allows (planned here too)
            boosted = self._trainer.config.elastic and self._trainer.elastic.boosted
            privacy = self._private.plan(
                used, update, self._trainer.module, fence=self.lease.fence(), reuse=boosted
            )
            if privacy is None:
                return None
            if not privacy.rows:
                self._state.update(
                    cursor=cursor.to_dict(), **{EXCLUDED_STATE: self._private.excluded.state()}
                )
                self.source.save_state(
                    self.lineage, self._state, cursor.watermark, fence=self.lease.fence()
                )
                self._cursor = cursor
                return None
        champion = self._sync_base()
        parent = self._working
        assert parent is not None  # set by start()
        self._observe(passed_rows)
        lr = 0.0
        if privacy is not None and self._private is not None:
            lr = self._private.train(self._trainer, privacy, self._labels)
            self._train_plain(self._shadow, used, n)
        else:
            lr = self._train_plain(self._trainer, used, n)
        return self._publish(used, cursor, champion, parent, lr, privacy)

    def _train_plain(
        self, trainer: OnlineTrainer | None, used: list[StoredExample], n: int
    ) -> float:
        """Non-private updates, one per N examples (the learner without DP, or its shadow)."""
        assert trainer is not None
        lr = 0.0
        for i in range(0, len(used), n):
            x, y, w = as_arrays(used[i : i + n], self._labels)
            if len(y):
                stats = trainer.update(x, y, w)
                lr = stats.lr
                trainer.log_replacement(stats)
        return lr

    def _sync_base(self) -> ModelVersion:
        """The champion now; if someone else moved it, continue from it instead of our line."""
        assert self._trainer is not None
        champion = self.registry.champion_version()
        assert champion is not None
        if champion != self._state.get("champion_seen", champion):
            log.info("learner continues from champion v%s (was v%s)", champion, self._working)
            self._trainer.reset_module(self.registry.load(champion).module)
            if self._shadow is not None:
                self._shadow.reset_module(self.registry.load(champion).module)
            self._working = champion
        return champion

    def _observe(self, rows: list[StoredExample]) -> None:
        """Feed the drift detector and shift score; remember where a change was seen, so the
        gate's "recent" data starts there instead of mixing in the world before it."""
        assert self._trainer is not None
        corrections = [r for r in rows if r.is_correction]
        if not corrections:
            return
        errors = [r.error_type is not None for r in corrections]
        inputs = np.asarray([r.features for r in corrections])
        drift = self._trainer.observe_errors(errors)
        shift = self._trainer.observe_inputs(inputs)
        if self._shadow is not None:  # the run without DP gets the same drift response
            self._shadow.observe_errors(errors)
            self._shadow.observe_inputs(inputs)
        if drift or shift:
            self._state["change_at_id"] = min(r.id for r in corrections)
            if drift:  # labels changed: replay (here and after a restart) starts here
                self._state["replay_from_id"] = self._state["change_at_id"]
            if self._private is not None:
                self._private.change(self._state["change_at_id"])
            log.info(
                "change detected (%s) at example %d; learning rate x%.2f",
                "error drift" if drift else "input shift",
                self._state["change_at_id"],
                self._trainer.elastic.multiplier,
            )

    def _champion_module(self, version: ModelVersion) -> nn.Module:
        if self._champion_cache is None or self._champion_cache[0] != version:
            self._champion_cache = (version, self.registry.load(version).module)
        return self._champion_cache[1]

    def _publish(
        self,
        used: list[StoredExample],
        cursor: CursorState,
        champion: ModelVersion,
        parent: ModelVersion,
        lr: float,
        privacy: PrivacyOutcome | None = None,
    ) -> Candidate:
        assert self._trainer is not None
        self._between_steps()
        g, learner = self.config.gate, self.config.learner
        recent_rows = self.source.recent_holdout(g.gate_recent_holdout)
        since = int(self._state.get("change_at_id", 0))
        after_change = [r for r in recent_rows if r.id >= since]
        if len(after_change) >= g.gate_min_holdout:
            recent_rows = after_change
        recent = holdout_of(recent_rows, self._spec.labels)  # unknown labels count as wrong
        module = self._trainer.module
        gate = evaluate_gate(
            module,
            self._champion_module(champion),
            trusted=self._trusted,
            recent=recent,
            tolerance=g.gate_tolerance,
            min_recent=g.gate_min_holdout,
            serve_precision=self.config.serve_precision,
            concept_policy=g.gate_concept_change,
        )
        update = int(self._state.get("update", 0)) + 1
        first, last = min(r.id for r in used), max(r.id for r in used)
        summary = gate.summary()
        privacy_metrics: dict[str, float] = {}
        if privacy is not None and self._shadow is not None:
            privacy_metrics = privacy.metrics(self._shadow.module, self._trusted, recent)
            summary += (
                f"; without DP: recent {privacy_metrics['nonprivate_recent_accuracy']:.3f}"
                f", trusted {privacy_metrics['nonprivate_trusted_accuracy']:.3f}"
            )
        tags = {
            "parent_version": parent,
            "source": "online",
            "examples": f"ids {first}..{last} ({len(used)} new, update {update})",
            "epsilon": privacy.epsilon_tag if privacy else "none",
            "delta": privacy.delta_tag if privacy else "none",
            "gate": summary,
            "champion_at_gate": champion,
            LINEAGE_TAG: self.lineage,
            UPDATE_TAG: str(update),
            CURSOR_TAG: json.dumps(cursor.to_dict()),
        }
        if privacy is not None and privacy.ledger_id is not None:
            tags[LEDGER_TAG] = str(privacy.ledger_id)
        if privacy is not None and privacy.plan is not None:  # DP against the same run without
            tags |= privacy.comparison_tags(
                gate.recent_candidate, gate.trusted_candidate, privacy_metrics
            )
        if privacy is not None:
            tags.update(privacy.policy_tags())
        metrics = {
            **gate.metrics(),
            "lr": lr,
            "lr_multiplier": self._trainer.elastic.multiplier,
            "drifts_detected": float(self._trainer.elastic.drifts),
            "novel_share": self._trainer.elastic.last_shift,
            **privacy_metrics,
        }
        params = {
            "learn_batch": learner.learn_batch,
            "learn_steps": learner.learn_steps,
            "learn_lr": learner.learn_lr,
            "learn_replay": learner.learn_replay,
            "examples": len(used),
            "first_example_id": first,
            "last_example_id": last,
            **(privacy.params() if privacy else {"dp": False}),
        }
        self._between_steps()  # the last point where a stop leaves nothing published
        # FLYWHEEL_GATE_REGISTER_FAILED=false: a rejected candidate is not registered (a
        # private one always is: the privacy ledger names the version its budget went to)
        version: ModelVersion | None = None
        if gate.passed or g.gate_register_failed or privacy is not None:
            self.lease.fence().check()  # MLflow is outside the store: fail closed right before
            version = self.registry.publish(
                self._spec, module, tags=tags, params=params, metrics=metrics
            )
            if privacy is not None and self._private is not None:
                self._private.published(privacy, version, fence=self.lease.fence())
        promoted = False
        if version is not None and gate.passed and g.auto_promote:
            self._promote(version, summary)
            promoted, champion = True, version
            self._champion_cache = (version, copy.deepcopy(module))
        elif version is not None and gate.passed:
            self.registry.set_tags(version, {"review": "pending"})
        self._state.update(
            update=update,
            # not registered: a restart resumes from the last registered version
            working_version=version or self._state.get("working_version"),
            champion_seen=champion,
            cursor=cursor.to_dict(),
            elastic=self._trainer.elastic.state(),
        )
        if self._private is not None:
            self._state[EXCLUDED_STATE] = self._private.excluded.state()
        self.source.save_state(
            self.lineage, self._state, cursor.watermark, fence=self.lease.fence()
        )
        self._cursor = cursor
        if version is not None:  # else the line goes on in memory from the last registered
            self._working = version
        dp_numbers = None
        if privacy is not None and privacy.plan is not None:
            dp_numbers = {
                "epsilon": privacy.plan.epsilon_lineage,
                "recent_accuracy": gate.recent_candidate,
                "trusted_accuracy": gate.trusted_candidate,
                **{k: v for k, v in privacy_metrics.items() if k.startswith("nonprivate_")},
            }
        candidate = Candidate(
            version, parent, gate, promoted, len(used), first, last, update, lr, dp_numbers
        )
        self.stats.candidates += 1
        self.stats.promoted += int(promoted)
        self.stats.examples += len(used)
        self.stats.last = candidate
        self.stats.history.append(candidate)
        log.info(
            "candidate v%s from v%s on %d examples (lr %.4g): %s%s",
            version or "(not registered)",
            parent,
            len(used),
            lr,
            gate.summary(),
            " -> champion" if promoted else "",
        )
        if self.on_candidate:
            self.on_candidate(candidate)
        return candidate

    def _promote(self, version: ModelVersion, summary: str) -> None:
        from flywheel.promotion import promote

        self.lease.fence().check()  # the alias move is outside the store: fail closed
        promote(
            self.config.kafka,
            version,
            reason=f"gate {summary}",
            actor="flywheel-learner",
            registry=self.registry,
            gate=summary,
            guard=self.config.gate.live_guard,
        )

    # ---- live decisions -----------------------------------------------------------------
    def _lease_check(self) -> None:
        self.lease.fence().check()  # the registry is outside the store: fail closed

    def judge_if_due(self, now: float | None = None) -> list[LiveVerdict] | None:
        """Run the live judge (learner/live.py) if FLYWHEEL_LIVE_JUDGE_INTERVAL_S has passed
        since it last ran; its verdicts, or None when it was not due. A failure other than
        a lost lease is logged and waits for the next interval: live decisions never stop
        the learner."""
        now = time.monotonic() if now is None else now
        interval = self.config.gate.live_judge_interval_s
        if self._judged_at is not None and now - self._judged_at < interval:
            return None
        self._judged_at = now
        try:
            return self.judge.step()
        except LeaseLost:
            raise
        except Exception as exc:
            log.warning("live judge failed (next try in %.0f s): %s", interval, exc)
            return None

    # ---- loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, holding the lineage's lease (waiting as a standby while
        another learner holds it). A failing step is logged and retried after a pause; a
        lost lease sends the learner back to standby; `stop` abandons a step in progress
        (nothing of it is published) and lets the lease go."""
        self.stop_event = stop
        try:
            while not stop.is_set():
                if not self.lease.held:
                    self.lease.drop()
                    self._started = False  # the state is read again under the lease
                    if not self.lease.wait(stop):
                        break
                self.lease.start_renewing()
                try:
                    candidate = self.step()
                except StepAbandoned:
                    log.info("learner %s: step abandoned for a stop", self.lineage)
                    break
                except LeaseLost as exc:
                    log.warning("learner %s goes back to standby: %s", self.lineage, exc)
                    self.lease.drop()
                    continue
                except Exception as exc:
                    self._started = False  # reload state: nothing of the failed step was saved
                    stop.wait(self.failure_pause(exc))
                    continue
                self.recovered()
                try:
                    self.judge_if_due()
                except LeaseLost as exc:
                    log.warning("learner %s goes back to standby: %s", self.lineage, exc)
                    self.lease.drop()
                    continue
                if candidate is None:
                    stop.wait(self.config.learner.learn_poll_s)
        finally:
            self.lease.release()
            self._started = False

    def failure_pause(self, exc: Exception) -> float:
        """How long to wait before retrying a failed step: the shared backoff
        (FLYWHEEL_RETRY_*), doubling per failure in a row up to its cap. An outage marks
        its dependency down; `Fatal` for a refusal no retry fixes (credentials, schema)."""
        reason = fatal_reason(exc)
        if reason is not None:
            raise Fatal(f"learner: {reason}") from exc
        pause = self._policy.delay(self._failures)
        self._failures += 1
        if transient(exc):
            name = dependency_of(exc)
            self.dependencies.down(name, exc)
            log.warning("learner step: %s unavailable (%s); retry in %.1f s", name, exc, pause)
        else:
            log.exception("learner step failed; retrying in %.1f s", pause, exc_info=exc)
        return pause

    def recovered(self) -> None:
        """A step succeeded: every dependency answered, the backoff starts over."""
        self._failures = 0
        for name, up in self.dependencies.states().items():
            if not up:
                self.dependencies.up(name)
