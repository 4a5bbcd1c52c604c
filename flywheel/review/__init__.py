"""Reviewing model versions: what a reviewer sees, and the decisions they record.

One module for the terminal (`flywheel models diff | card | pending | approve | reject`)
and the browser (`/ui` and `/v1/review/...` in the service), so both show the same facts:

* versions as plain data (status, source, parent, examples, ε/δ, gate) and their lineage;
* a diff of two versions on both holdouts -- the trusted seed holdout and the recent
  `holdout` corrections of the training store -- with where they disagree, the gate numbers,
  the training data behind each and the distance between their weights;
* a model card (markdown and plots);
* review decisions with auto-promotion off: the learner tags a passed candidate
  `review=pending`; approving promotes it through `flywheel.promotion.promote` (so the
  model event is published), rejecting leaves the champion alone. Both are recorded on the
  version as tags `review`, `review_by`, `review_reason`, `review_at`.

Importing this module is cheap (no torch, no MLflow): the CLI imports it for `--help`.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from sqlalchemy.engine import Engine
    from torch import nn

    from flywheel.events import ModelEvent
    from flywheel.modelspec import ModelSpec
    from flywheel.registry import LoadedVersion, Registry, VersionInfo
    from flywheel.settings import Settings

REVIEW_TAG = "review"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
REVIEW_BY, REVIEW_REASON, REVIEW_AT = "review_by", "review_reason", "review_at"
MAX_REASON = 1000  # characters; an MLflow tag value holds 5000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
LINEAGE_KEYS = ("version", "champion", "status", "source", "parent_version", "examples",
                "epsilon", "delta", "gate", "created_at")
_NO_PARENT = {"", "none", "null", "-"}
# "ids 12..340 (300 new, update 4)" (the learner) or "[100,200)" (half-open, hand-made)
_IDS_RANGE = re.compile(r"\bids\s+(\d+)\s*\.\.\s*(\d+)")
_HALF_OPEN = re.compile(r"^\s*\[(\d+)\s*,\s*(\d+)\)")
ALL_TIME_HOURS = 24.0 * 365 * 100
CARD_RUNS = 60  # hops of a lineage whose gate numbers a model card fetches (a query each)
CARD_HOPS = 30  # hops of a lineage a model card lists (the chart shows CARD_RUNS)


class ReviewError(ValueError):
    """A review request that cannot be done as asked (not pending, empty reason)."""


# --- versions as plain data ------------------------------------------------------------------


def parent_of(tags: dict[str, str]) -> str | None:
    raw = tags.get("parent_version", "").strip()
    if raw.lower() in _NO_PARENT:
        return None
    return raw[1:] if raw[:1] in "vV" and raw[1:].isdigit() else raw


def status(info: VersionInfo, history: set[str]) -> str:
    """champion | rolled back | former champion | pending review | review rejected | candidate.

    From the alias, the champion history and the audit tags promotions, rollbacks, reviews
    and the learner (`review=pending`) leave.
    """
    if info.is_champion:
        return "champion"
    rolled, promoted = info.tags.get("rolled_back_at"), info.tags.get("promoted_at")
    if rolled and (not promoted or rolled >= promoted):  # one ISO format: string order works
        return "rolled back"
    if promoted or info.version in history:
        return "former champion"
    review = info.tags.get(REVIEW_TAG)
    if review == PENDING:  # passed its gate; auto-promotion is off
        return "pending review"
    if review == REJECTED:
        return "review rejected"
    return "candidate"


def finite(value: float | None) -> float | None:
    """NaN (an empty holdout) is not JSON; it becomes null."""
    return value if value is not None and math.isfinite(value) else None


def version_doc(info: VersionInfo, history: set[str]) -> dict[str, Any]:
    """One version as JSON-ready data; every key is always there (null when unknown)."""
    tags = info.tags
    return {
        "version": info.version,
        "champion": info.is_champion,
        "status": status(info, history),
        "source": tags.get("source"),
        "parent_version": parent_of(tags),
        "examples": tags.get("examples"),
        "epsilon": tags.get("epsilon"),
        "delta": tags.get("delta"),
        "gate": tags.get("gate"),
        "created_at": info.created_at.isoformat(),
        "run_id": info.run_id,
        "tags": dict(sorted(tags.items())),
        "params": dict(sorted(info.params.items())),
        "metrics": {k: finite(v) for k, v in sorted(info.metrics.items())},
    }


def lineage(version: str, by_version: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The version, its parent, the parent's parent, ... down to a version without one.

    A parent that is not in the registry (deleted) ends the chain as `missing: true`;
    a loop in the tags ends it too, rather than hanging.
    """
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = version
    while current is not None and current not in seen:
        seen.add(current)
        doc = by_version.get(current)
        if doc is None:
            chain.append({k: None for k in LINEAGE_KEYS} | {
                "version": current, "champion": False, "status": "not in the registry",
                "missing": True})
            break
        chain.append({k: doc[k] for k in LINEAGE_KEYS} | {"missing": False})
        current = doc["parent_version"]
    return chain


def gate_passed(doc: dict[str, Any]) -> bool | None:
    """What the gate decided: the `gate_passed` metric, else the tag's first word."""
    value = (doc.get("metrics") or {}).get("gate_passed")
    if value is not None:
        return bool(value)
    gate = (doc.get("gate") or "").strip().lower()
    if gate.startswith("passed"):
        return True
    if gate.startswith("rejected"):
        return False
    return None


def gate_numbers(doc: dict[str, Any]) -> dict[str, float | None]:
    return {k: v for k, v in (doc.get("metrics") or {}).items() if k.startswith("gate_")}


def review_of(doc: dict[str, Any]) -> dict[str, str | None]:
    tags = doc.get("tags") or {}
    return {"state": tags.get(REVIEW_TAG), "by": tags.get(REVIEW_BY),
            "reason": tags.get(REVIEW_REASON), "at": tags.get(REVIEW_AT)}


def registry_docs(registry: Registry, *, with_runs: bool = True, limit: int = 0
                  ) -> list[dict[str, Any]]:
    """The newest `limit` versions (0: all) as `version_doc`s, newest first."""
    history = set(registry.champion_history())
    listed = registry.versions(with_runs=False)
    shown = listed[:limit] if limit else listed
    if with_runs:  # a run costs a query: fetch runs only for the versions shown
        shown = [registry.info(v.version, with_run=True) for v in shown]
    return [version_doc(v, history) for v in shown]


def epsilon_value(text: str | None) -> float | None:
    """The `epsilon` tag as a number; `none` (no private data) and junk are None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return finite(value)


# --- training data ---------------------------------------------------------------------------


def example_range(tag: str | None) -> tuple[int, int] | None:
    """Store ids (inclusive) named by an `examples` tag; None for seed data or free text."""
    if not tag:
        return None
    match = _IDS_RANGE.search(tag)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        return (lo, hi) if lo <= hi else None
    match = _HALF_OPEN.match(tag)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2)) - 1
        return (lo, hi) if lo <= hi else None
    return None


def open_store_or_reason(settings: Settings) -> tuple[Engine | None, str | None]:
    """The training store if it is there and migrated, else (None, why not).

    A review works without a store (registry facts only): a missing SQLite file is not
    created, and an un-migrated store is reported rather than raised.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel.store import SchemaNotCurrent, display_url, normalize_url, open_store

    url = settings.resolved_database_url
    try:
        parsed = normalize_url(url)
        local = parsed.get_backend_name() == "sqlite" and parsed.database not in (
            None, "", ":memory:")
        if local and not Path(parsed.database).exists():
            return None, f"no training store at {display_url(parsed)} yet"
        return open_store(url), None
    except SchemaNotCurrent as exc:
        return None, str(exc)
    except (SQLAlchemyError, OSError, ValueError) as exc:
        return None, f"training store unusable: {' '.join(str(exc).split())[:300]}"


def data_counts(engine: Engine, lo: int, hi: int) -> dict[str, Any]:
    """Examples with ids in [lo, hi] by origin and split; counterexamples among them."""
    from sqlalchemy import func, select

    from flywheel.store import Example, Origin, session_factory

    query = (select(Example.origin, Example.split, func.count())
             .where(Example.id.between(lo, hi)).group_by(Example.origin, Example.split))
    with session_factory(engine)() as session:
        rows = session.execute(query).all()
    origins: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    for origin, split, n in rows:
        origins[origin] += n
        splits[split] += n
    return {"range": [lo, hi], "total": sum(origins.values()),
            "counterexamples": origins[Origin.COUNTEREXAMPLE.value],
            "by_origin": dict(sorted(origins.items())), "by_split": dict(sorted(splits.items()))}


def version_data(doc: dict[str, Any], engine: Engine | None) -> dict[str, Any]:
    """What a version was trained on: its `examples` tag and, from the store, what is there."""
    span = example_range(doc.get("examples"))
    out: dict[str, Any] = {"examples": doc.get("examples"), "range": list(span) if span else None,
                           "total": None, "counterexamples": None, "by_origin": None,
                           "by_split": None}
    if span is not None and engine is not None:
        out |= data_counts(engine, *span)
    return out


# --- holdouts and scores ---------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSet:
    """Inputs and their true label names; `labels` of a model index into its own spec."""

    name: str
    x: np.ndarray
    labels: list[str]
    about: str

    def __len__(self) -> int:
        return len(self.labels)


def trusted_holdout(settings: Settings) -> LabelledSet:
    """The frozen seed holdout the gate's "trusted" numbers come from."""
    from flywheel.store.trusted import HOLDOUT_FRACTION, seed_data
    from flywheel.streams import LABELS

    _, _, x, y = seed_data(settings)
    return LabelledSet("trusted", x, [LABELS[int(i)] for i in y],
                       f"seed holdout: {HOLDOUT_FRACTION:.0%} of {settings.seed_examples} seed "
                       f"examples (FLYWHEEL_SEED={settings.seed})")


def recent_holdout(settings: Settings, engine: Engine) -> LabelledSet:
    """The newest `FLYWHEEL_GATE_RECENT_HOLDOUT` corrections of the `holdout` split."""
    import numpy as np

    from flywheel.learner.example_source import ExampleSource

    rows = ExampleSource(engine).recent_holdout(settings.gate_recent_holdout)
    widths = {len(r.features) for r in rows}
    if len(widths) > 1:  # a width change: keep the most common one
        width = Counter(len(r.features) for r in rows).most_common(1)[0][0]
        rows = [r for r in rows if len(r.features) == width]
    x = (np.asarray([r.features for r in rows], dtype=np.float32) if rows
         else np.empty((0, 0), np.float32))
    return LabelledSet("recent", x, [r.label for r in rows],
                       f"newest {len(rows)} holdout corrections in the training store "
                       f"(at most FLYWHEEL_GATE_RECENT_HOLDOUT={settings.gate_recent_holdout})")


def predict(module: nn.Module, spec: ModelSpec, x: np.ndarray
            ) -> tuple[list[str], np.ndarray] | None:
    """(predicted label names, log-probabilities), or None if the widths do not match."""
    import numpy as np
    import torch

    if len(x) == 0 or x.ndim != 2 or x.shape[1] != spec.input_dim:
        return None
    module.eval()
    with torch.inference_mode():
        logp = torch.log_softmax(module(torch.from_numpy(np.asarray(x, np.float32))), dim=1)
    names = [spec.labels[i] for i in logp.argmax(1).tolist()]
    return names, logp.numpy()


def scores(spec: ModelSpec, predicted: tuple[list[str], np.ndarray] | None,
           truth: list[str]) -> dict[str, Any]:
    """Accuracy and mean log-loss over the rows whose true label the model knows."""
    if predicted is None:
        return {"n": 0, "accuracy": None, "log_loss": None,
                "note": "input width differs from this model's" if truth else "no rows"}
    names, logp = predicted
    index = spec.label_index()
    rows = [i for i, t in enumerate(truth) if t in index]
    if not rows:
        return {"n": 0, "accuracy": None, "log_loss": None,
                "note": "no row has a label this model knows"}
    correct = sum(names[i] == truth[i] for i in rows)
    loss = -sum(float(logp[i, index[truth[i]]]) for i in rows) / len(rows)
    out: dict[str, Any] = {"n": len(rows), "accuracy": correct / len(rows),
                           "log_loss": finite(loss)}
    if len(rows) < len(truth):
        out["note"] = f"{len(truth) - len(rows)} rows with labels this model lacks left out"
    return out


def disagreement(pred_a: list[str], pred_b: list[str], truth: list[str],
                 top: int = 10) -> dict[str, Any]:
    """Where two versions' predictions differ, and which (predicted → actual) errors changed."""
    n = len(truth)
    differ = sum(a != b for a, b in zip(pred_a, pred_b, strict=True))
    fixed = sum(a != t and b == t for a, b, t in zip(pred_a, pred_b, truth, strict=True))
    broken = sum(a == t and b != t for a, b, t in zip(pred_a, pred_b, truth, strict=True))
    conf_a = Counter((a, t) for a, t in zip(pred_a, truth, strict=True) if a != t)
    conf_b = Counter((b, t) for b, t in zip(pred_b, truth, strict=True) if b != t)
    changed = [{"predicted": p, "actual": t, "a": conf_a[(p, t)], "b": conf_b[(p, t)],
                "change": conf_b[(p, t)] - conf_a[(p, t)]}
               for (p, t) in sorted(set(conf_a) | set(conf_b))
               if conf_a[(p, t)] != conf_b[(p, t)]]
    changed.sort(key=lambda c: (-abs(c["change"]), c["predicted"], c["actual"]))
    return {"n": n, "disagree": differ, "share": differ / n if n else None,
            "fixed": fixed, "broken": broken, "changed_confusions": changed[:top]}


def parameter_distance(a: LoadedVersion, b: LoadedVersion, top: int = 5) -> dict[str, Any]:
    """L2 norm of the weight difference (every float tensor of the state dict), if the specs
    match; with the norm of A's weights for scale and the tensors that moved most."""
    import torch

    if a.spec != b.spec:
        changed = sorted(k for k in type(a.spec).model_fields
                         if getattr(a.spec, k) != getattr(b.spec, k))
        return {"comparable": False, "reason": f"specs differ in {', '.join(changed)}",
                "l2": None, "relative": None, "tensors": []}
    sa, sb = a.module.state_dict(), b.module.state_dict()
    total = base = 0.0
    per: list[dict[str, Any]] = []
    for name, ta in sa.items():
        tb = sb.get(name)
        if tb is None or not torch.is_floating_point(ta) or ta.shape != tb.shape:
            continue
        d = float(torch.linalg.vector_norm((tb - ta).double()))
        total += d * d
        base += float(torch.linalg.vector_norm(ta.double())) ** 2
        per.append({"tensor": name, "l2": d})
    per.sort(key=lambda t: -t["l2"])
    l2 = math.sqrt(total)
    return {"comparable": True, "reason": None, "l2": l2,
            "relative": l2 / math.sqrt(base) if base else None, "tensors": per[:top]}


# --- diff ------------------------------------------------------------------------------------


def diff(settings: Settings, a: str, b: str, *, registry: Registry | None = None,
         engine: Engine | None = None) -> dict[str, Any]:
    """Everything that tells two versions apart, as JSON-ready data (see module doc)."""
    from flywheel.registry import Registry

    registry = registry or Registry(settings)
    history = set(registry.champion_history())
    docs = {v: version_doc(registry.info(v, with_run=True), history) for v in (a, b)}
    store_note = None
    if engine is None:
        engine, store_note = open_store_or_reason(settings)
    loaded = {v: registry.load(v) for v in (a, b)}
    sets: list[LabelledSet] = [trusted_holdout(settings)]
    if engine is not None:
        sets.append(recent_holdout(settings, engine))
    holdouts: dict[str, Any] = {}
    for hs in sets:
        preds = {v: predict(loaded[v].module, loaded[v].spec, hs.x) for v in (a, b)}
        entry: dict[str, Any] = {"available": True, "about": hs.about, "n": len(hs),
                                 "a": scores(loaded[a].spec, preds[a], hs.labels),
                                 "b": scores(loaded[b].spec, preds[b], hs.labels)}
        pa, pb = preds[a], preds[b]
        entry["disagreement"] = (disagreement(pa[0], pb[0], hs.labels)
                                 if pa is not None and pb is not None else None)
        holdouts[hs.name] = entry
    if "recent" not in holdouts:
        holdouts["recent"] = {"available": False, "about": store_note, "n": 0, "a": None,
                              "b": None, "disagreement": None}

    def side(v: str) -> dict[str, Any]:
        d = docs[v]
        return {k: d[k] for k in LINEAGE_KEYS} | {
            "gate_passed": gate_passed(d), "gate_numbers": gate_numbers(d),
            "review": review_of(d), "data": version_data(d, engine)}

    return {"model_name": registry.name, "a": side(a), "b": side(b), "holdouts": holdouts,
            "parameters": parameter_distance(loaded[a], loaded[b]), "store": store_note}


# --- error reports from the feedback loop ----------------------------------------------------


def error_mix(engine: Engine, model_name: str, hours: float) -> dict[str, Any]:
    """The feedback report per version (corrections, error rate, error-type mix, confusions),
    with accuracy = 1 - error rate on the corrected predictions of the window."""
    from flywheel.feedback.report import error_report
    from flywheel.store import session_factory

    with session_factory(engine)() as session:
        doc = error_report(session, model_name, hours)
    for v in doc["versions"]:
        v["accuracy"] = 1.0 - v["error_rate"] if v["corrections"] else None
    return doc


def accuracy_timeline(engine: Engine, model_name: str, hours: float,
                      now: datetime | None = None) -> dict[str, Any]:
    """Accuracy of the corrected predictions per version and hour (the store keeps hourly
    counters), oldest first: the "rolling accuracy" chart of the review page."""
    from sqlalchemy import select

    from flywheel.store import session_factory
    from flywheel.store.models import ErrorCount

    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    query = (select(ErrorCount.model_version, ErrorCount.hour, ErrorCount.outcome,
                    ErrorCount.count)
             .where(ErrorCount.model_name == model_name, ErrorCount.hour >= since))
    with session_factory(engine)() as session:
        rows = session.execute(query).all()
    cells: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for version, hour, outcome, count in rows:
        cell = cells[(version, hour)]
        cell[0] += count
        cell[1] += count if outcome == "correct" else 0
    points = [{"version": v, "hour": h.isoformat(), "corrections": total,
               "accuracy": right / total if total else None}
              for (v, h), (total, right) in sorted(cells.items(), key=lambda kv: kv[0][1])]
    return {"model_name": model_name, "window_hours": hours, "points": points}


def privacy_ledger(engine: Engine | None, store_note: str | None = None) -> dict[str, Any]:
    """ε spent per source (the privacy unit) and per version, from the privacy ledger in the
    training store (`flywheel.privacy.PrivacyLedger`). Without the ledger (no store, or a
    build without privacy) reviewers see ε from the version tags only, and this says so."""
    missing = {"available": False, "sources": [], "versions": []}
    try:
        from flywheel.privacy import PrivacyLedger
    except ImportError:
        return missing | {"note": "this build has no privacy ledger (flywheel.privacy): ε "
                                  "here comes from version tags only"}
    if engine is None:
        return missing | {"note": f"the privacy ledger lives in the training store, which is "
                                  f"not available ({store_note}): ε here comes from version "
                                  "tags only"}
    try:
        ledger = PrivacyLedger(engine)
        sources = [{"source": s.source, "epsilon": finite(s.epsilon), "updates": s.updates,
                    "examples": s.examples, "versions": list(s.versions)}
                   for s in ledger.sources()]
        versions = [{"version": e.version, "lineage": e.lineage, "update": e.update_no,
                     "epsilon_update": finite(e.epsilon_update),
                     "epsilon_lineage": finite(e.epsilon_lineage), "delta": e.delta,
                     "sources": e.sources, "examples": e.examples}
                    for e in ledger.entries()]
    except Exception as exc:  # a broken ledger must not take the review down
        return missing | {"note": "privacy ledger unreadable: "
                                  f"{' '.join(str(exc).split())[:300]}"}
    return {"available": True, "sources": sources, "versions": versions,
            "note": None if sources else "no DP update is recorded in the privacy ledger yet"}


# --- review decisions ------------------------------------------------------------------------


def check_reason(reason: str | None) -> str:
    """The reason as recorded (an MLflow tag): not empty, not too long, and no control
    characters but newlines and tabs (PostgreSQL text cannot hold a NUL)."""
    text = (reason or "").strip()
    if not text:
        raise ReviewError("a review decision needs a reason (it is recorded on the version)")
    if len(text) > MAX_REASON:
        raise ReviewError(f"the reason is {len(text)} characters; at most {MAX_REASON}")
    control = _CONTROL.search(text)
    if control:
        raise ReviewError(f"the reason holds a control character ({control.group()!r})")
    return text


def _actor(actor: str | None) -> str:
    from flywheel.promotion import default_actor

    return (actor or "").strip() or default_actor()


def pending(registry: Registry) -> list[dict[str, Any]]:
    """Versions waiting for a reviewer (passed their gate, auto-promotion off), oldest first."""
    docs = [d for d in registry_docs(registry, with_runs=False)
            if d["status"] == "pending review"]
    return sorted(docs, key=lambda d: int(d["version"]) if d["version"].isdigit() else 0)


def _pending_info(registry: Registry, version: str) -> VersionInfo:
    info = registry.info(version, with_run=False)  # RegistryError if unknown
    state = info.tags.get(REVIEW_TAG)
    if info.is_champion:
        raise ReviewError(f"{registry.name} v{version} is already the champion")
    if state != PENDING:
        why = f"its review is {state!r}" if state else "it has no review tag"
        raise ReviewError(f"{registry.name} v{version} is not pending review ({why}); "
                          "`flywheel models promote` moves the champion without a review")
    return info


def approve(settings: Settings, version: str, *, reason: str, actor: str | None = None,
            registry: Registry | None = None, notify: bool = True) -> ModelEvent:
    """Approve a pending candidate: promote it (model event included), then record the review."""
    from flywheel import promotion
    from flywheel.registry import Registry

    reason, actor = check_reason(reason), _actor(actor)
    registry = registry or Registry(settings)
    _pending_info(registry, str(version))
    event = promotion.promote(settings, str(version), reason=f"review approved: {reason}",
                              actor=actor, registry=registry, notify=notify)
    registry.set_tags(str(version), {REVIEW_TAG: APPROVED, REVIEW_BY: actor,
                                     REVIEW_REASON: reason, REVIEW_AT: _now_iso()})
    return event


def reject(settings: Settings, version: str, *, reason: str, actor: str | None = None,
           registry: Registry | None = None) -> dict[str, str]:
    """Reject a pending candidate; the champion stays. Returns the tags recorded."""
    from flywheel.registry import Registry

    reason, actor = check_reason(reason), _actor(actor)
    registry = registry or Registry(settings)
    _pending_info(registry, str(version))
    tags = {REVIEW_TAG: REJECTED, REVIEW_BY: actor, REVIEW_REASON: reason, REVIEW_AT: _now_iso()}
    registry.set_tags(str(version), tags)
    return tags


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- model card ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    markdown: Path
    plots: list[Path]
    doc: dict[str, Any]


def card(settings: Settings, version: str, out_dir: Path, *, registry: Registry | None = None,
         engine: Engine | None = None, hours: float = ALL_TIME_HOURS) -> Card:
    """Write DIR/model-card-vN.md and its plots; returns where, and the facts behind it."""
    from flywheel.registry import Registry

    registry = registry or Registry(settings)
    history = set(registry.champion_history())
    info = registry.info(str(version), with_run=True)
    by_version = {v.version: version_doc(v, history)
                  for v in registry.versions(with_runs=False)}
    doc = version_doc(info, history)
    by_version[info.version] = doc
    chain = lineage(info.version, by_version)
    # the gate numbers of each hop (runs only for the newest hops, not the whole registry)
    for hop in chain[:CARD_RUNS]:
        if not hop["missing"]:
            hop_doc = doc if hop["version"] == info.version else version_doc(
                registry.info(hop["version"], with_run=True), history)
            hop["gate_numbers"] = gate_numbers(hop_doc)
            hop["gate_passed"] = gate_passed(hop_doc)
            hop["holdout_accuracy"] = hop_doc["metrics"].get("holdout_accuracy")
    store_note = None
    if engine is None:
        engine, store_note = open_store_or_reason(settings)
    errors = None
    if engine is not None:
        report = error_mix(engine, registry.name, hours)
        errors = next((v for v in report["versions"] if v["model_version"] == info.version),
                      None)
    facts = {"model_name": registry.name, "version": doc, "lineage": chain,
             "data": version_data(doc, engine), "errors": errors, "store": store_note,
             "privacy": privacy_ledger(engine, store_note),
             "trusted": trusted_holdout(settings).about}
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _card_plots(facts, out_dir)
    path = out_dir / f"model-card-v{info.version}.md"
    path.write_text(_card_markdown(facts, [p.name for p in plots]), encoding="utf-8")
    return Card(path, plots, facts)


def _md(text: object) -> str:
    """A table cell: pipes escaped, one line."""
    return " ".join(str(text).split()).replace("|", "\\|") if text not in (None, "") else "—"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _card_markdown(f: dict[str, Any], plots: list[str]) -> str:
    d, name = f["version"], f["model_name"]
    review = review_of(d)
    tags = d["tags"]
    lines = [f"# Model card: {name} v{d['version']}", "",
             "| | |", "| --- | --- |",
             f"| status | {_md(d['status'])} |",
             f"| source | {_md(d['source'])} |",
             f"| parent | {_md('v' + d['parent_version'] if d['parent_version'] else None)} |",
             f"| created (UTC) | {_md(d['created_at'])} |",
             f"| MLflow run | {_md(d['run_id'])} |",
             f"| gate | {_md(d['gate'])} |"]
    if review["by"]:
        lines.append(f"| review | {_md(review['state'])} by {_md(review['by'])} at "
                     f"{_md(review['at'])}: {_md(review['reason'])} |")
    elif review["state"]:
        lines.append(f"| review | {_md(review['state'])} |")
    if tags.get("promoted_at"):
        lines.append(f"| promoted | by {_md(tags.get('promoted_by'))} at "
                     f"{_md(tags['promoted_at'])}: {_md(tags.get('promotion_reason'))} |")
    if tags.get("rolled_back_at"):
        lines.append(f"| rolled back | by {_md(tags.get('rolled_back_by'))} at "
                     f"{_md(tags['rolled_back_at'])}: {_md(tags.get('rollback_reason'))} |")

    chain = f["lineage"]
    names = [f"v{h['version']}" + (" (missing)" if h["missing"] else "") for h in chain]
    if len(names) > 12:
        names = names[:10] + [f"… {len(names) - 11} more …", names[-1]]
    lines += ["", "## Lineage", "",
              " ← ".join(names)
              + ("" if chain[-1]["missing"] else "  (the first model: no parent)"), "",
              "| version | status | source | examples | ε | δ | gate |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    shown = chain if len(chain) <= CARD_HOPS else chain[:CARD_HOPS - 1] + chain[-1:]
    for i, h in enumerate(shown):
        if len(shown) < len(chain) and i == len(shown) - 1:
            lines.append(f"| … | {len(chain) - len(shown)} more (all: `flywheel models show "
                         f"{d['version']} --json`) | | | | | |")
        lines.append(f"| v{h['version']} | {_md(h['status'])} | {_md(h['source'])} | "
                     f"{_md(h['examples'])} | {_md(h['epsilon'])} | {_md(h['delta'])} | "
                     f"{_md(h['gate'])} |")
    if "lineage.png" in plots:
        lines += ["", "![accuracy and ε along the lineage](lineage.png)"]

    data = f["data"]
    lines += ["", "## Data", "", f"- examples tag: {_md(data['examples'])}"]
    if data["range"]:
        lines.append(f"- training store ids {data['range'][0]}..{data['range'][1]}: "
                     f"{_md(data['total'])} examples, {_md(data['counterexamples'])} of them "
                     "counterexamples")
        if data["by_origin"]:
            lines.append("- by origin: " + ", ".join(f"{k} {v}"
                                                     for k, v in data["by_origin"].items()))
        if data["by_split"]:
            lines.append("- by split: " + ", ".join(f"{k} {v}"
                                                    for k, v in data["by_split"].items()))
    elif (data["examples"] or "").startswith("seed"):
        lines.append("- seed data: the platform's own synthetic data, not in the training store")
    if f["store"]:
        lines.append(f"- training store: {_md(f['store'])}")
    lines.append(f"- trusted holdout: {f['trusted']}")

    lines += ["", "## Gate decisions", "",
              "| version | decision | recent (cand / champ) | trusted (cand / champ) | n recent |",
              "| --- | --- | --- | --- | --- |"]
    for h in chain[:CARD_HOPS]:
        if h["missing"]:
            continue
        g = h.get("gate_numbers") or {}
        decision = {True: "passed", False: "rejected", None: "—"}[h.get("gate_passed")]
        if decision == "—" and h["gate"]:
            decision = h["gate"].split(":", 1)[0]
        trusted_c = g.get("gate_trusted_candidate", h.get("holdout_accuracy"))
        n_recent = g.get("gate_recent_n")
        lines.append(f"| v{h['version']} | {_md(decision)} | "
                     f"{_num(g.get('gate_recent_candidate'))} / "
                     f"{_num(g.get('gate_recent_champion'))} | {_num(trusted_c)} / "
                     f"{_num(g.get('gate_trusted_champion'))} | "
                     f"{_md(None if n_recent is None else int(n_recent))} |")

    lines += ["", "## Privacy spent", "",
              f"- this version: ε = {_md(d['epsilon'])}, δ = {_md(d['delta'])}"]
    spent = [(h["version"], epsilon_value(h["epsilon"])) for h in chain if not h["missing"]]
    private = [(v, e) for v, e in spent if e is not None]
    if private:
        lines.append("- along the lineage (newest first): " + ", ".join(
            f"v{v} ε={e:g}" for v, e in private[:CARD_HOPS])
            + (f", … ({len(private) - CARD_HOPS} more)" if len(private) > CARD_HOPS else ""))
    else:
        lines.append("- no version in the lineage reports an ε (trained on the platform's own "
                     "data, or before privacy accounting)")
    ledger = f["privacy"]
    mine = [e for e in ledger["versions"] if e["version"] == d["version"]]
    for e in mine:
        lines.append(f"- privacy ledger, update {e['update']} of {_md(e['lineage'])}: "
                     f"ε {_num(e['epsilon_update'])} for this update, "
                     f"{_num(e['epsilon_lineage'])} for the lineage so far "
                     f"({e['sources']} sources, {e['examples']} examples)")
    used = [s for s in ledger["sources"] if d["version"] in s["versions"]]
    if used:
        lines += ["", "ε per source (the privacy unit) that trained this version, "
                  "cumulative over the sources' updates:", "",
                  "| source | ε spent | updates | examples |", "| --- | --- | --- | --- |"]
        lines += [f"| {_md(s['source'])} | {_num(s['epsilon'])} | {s['updates']} | "
                  f"{s['examples']} |" for s in used]
    elif ledger["note"]:
        lines.append(f"- per source: {ledger['note']}")
    else:
        lines.append("- per source: no source of this version is in the privacy ledger")

    lines += ["", "## Known error types", ""]
    errors = f["errors"]
    if errors is None or not errors["corrections"]:
        lines.append("No corrections of predictions served by this version are in the store "
                     "yet." if f["store"] is None else f"Unknown: {_md(f['store'])}.")
    else:
        lines += [f"{errors['corrections']} corrected predictions of v{d['version']}, "
                  f"{errors['errors']} wrong (error rate {errors['error_rate']:.1%}).", "",
                  "| error type | count |", "| --- | --- |"]
        lines += [f"| {_md(k)} | {v} |" for k, v in errors["error_types"].items()]
        if errors["confusions"]:
            lines += ["", "| predicted | actual | count |", "| --- | --- | --- |"]
            lines += [f"| {_md(c['predicted'])} | {_md(c['actual'])} | {c['count']} |"
                      for c in errors["confusions"]]
        if "errors.png" in plots:
            lines += ["", "![error types](errors.png)"]
    lines += ["", "Error types: `confident` (wrong with a high margin), `boundary` (low margin), "
              "`novel` (far from the training data), `suspect` (a correction that contradicts "
              "a confident model and its labelled neighbours; quarantined). See docs/feedback.md.",
              ""]
    return "\n".join(lines)


def _card_plots(f: dict[str, Any], out_dir: Path) -> list[Path]:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    hops = [h for h in reversed(f["lineage"][:CARD_RUNS]) if not h["missing"]]  # oldest first
    if hops:
        xs = [f"v{h['version']}" for h in hops]
        trusted = [(h.get("gate_numbers") or {}).get("gate_trusted_candidate",
                                                      h.get("holdout_accuracy")) for h in hops]
        recent = [(h.get("gate_numbers") or {}).get("gate_recent_candidate") for h in hops]
        eps = [epsilon_value(h["epsilon"]) for h in hops]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(xs) + 2), 3.4))
        for values, label, marker in ((trusted, "trusted holdout", "o"),
                                      (recent, "recent holdout", "s")):
            pts = [(i, v) for i, v in enumerate(values) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for i, h in enumerate(hops):
            if h.get("gate_passed") is False:
                ax.axvline(i, color="tab:red", alpha=0.15, linewidth=6)
        ax.set_xticks(range(len(xs)), xs, rotation=45 if len(xs) > 12 else 0, fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{f['model_name']}: lineage of v{f['version']['version']} "
                     "(red: gate rejected)", fontsize=9)
        if any(e is not None for e in eps):
            ax2 = ax.twinx()
            ax2.bar(range(len(xs)), [e or 0.0 for e in eps], alpha=0.2, color="tab:purple",
                    label="ε")
            ax2.set_ylabel("ε")
            ax.set_zorder(ax2.get_zorder() + 1)  # accuracy lines in front of the ε bars
            ax.patch.set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        written.append(out_dir / "lineage.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    errors = f["errors"]
    if errors and errors["error_types"]:
        kinds = list(errors["error_types"])
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        ax.bar(kinds, [errors["error_types"][k] for k in kinds], color="tab:orange")
        ax.set_ylabel("corrections")
        ax.set_title(f"error types of v{f['version']['version']} "
                     f"({errors['errors']} of {errors['corrections']} wrong)", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "errors.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
