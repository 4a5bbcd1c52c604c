"""Comparing two versions: both holdouts, where they disagree, the gate numbers, the data
behind each and the distance between their weights (`flywheel models diff`)."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from flywheel.review.holdouts import (
    LabelledSet,
    predicted_names,
    recent_holdout,
    score_doc,
    score_on,
    trusted_holdout,
)
from flywheel.review.store_views import open_store_or_reason, version_data
from flywheel.review.versions import (
    LINEAGE_KEYS,
    gate_numbers,
    gate_passed,
    review_of,
    version_doc,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from flywheel.registry import LoadedVersion, ModelVersion, Registry
    from flywheel.settings import GateSettings, StateSettings


def disagreement(
    pred_a: list[str], pred_b: list[str], truth: list[str], top: int = 10
) -> dict[str, Any]:
    """Where two versions' predictions differ, and which (predicted → actual) errors changed."""
    n = len(truth)
    differ = sum(a != b for a, b in zip(pred_a, pred_b, strict=True))
    fixed = sum(a != t and b == t for a, b, t in zip(pred_a, pred_b, truth, strict=True))
    broken = sum(a == t and b != t for a, b, t in zip(pred_a, pred_b, truth, strict=True))
    conf_a = Counter((a, t) for a, t in zip(pred_a, truth, strict=True) if a != t)
    conf_b = Counter((b, t) for b, t in zip(pred_b, truth, strict=True) if b != t)
    changed: list[dict[str, Any]] = [
        {
            "predicted": p,
            "actual": t,
            "a": conf_a[(p, t)],
            "b": conf_b[(p, t)],
            "change": conf_b[(p, t)] - conf_a[(p, t)],
        }
        for (p, t) in sorted(set(conf_a) | set(conf_b))
        if conf_a[(p, t)] != conf_b[(p, t)]
    ]
    changed.sort(key=lambda c: (-abs(c["change"]), c["predicted"], c["actual"]))
    return {
        "n": n,
        "disagree": differ,
        "share": differ / n if n else None,
        "fixed": fixed,
        "broken": broken,
        "changed_confusions": changed[:top],
    }


def parameter_distance(a: LoadedVersion, b: LoadedVersion, top: int = 5) -> dict[str, Any]:
    """L2 norm of the weight difference (every float tensor of the state dict), if the specs
    match; with the norm of A's weights for scale and the tensors that moved most."""
    import torch

    if a.spec != b.spec:
        changed = sorted(
            k for k in type(a.spec).model_fields if getattr(a.spec, k) != getattr(b.spec, k)
        )
        return {
            "comparable": False,
            "reason": f"specs differ in {', '.join(changed)}",
            "l2": None,
            "relative": None,
            "tensors": [],
        }
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
    return {
        "comparable": True,
        "reason": None,
        "l2": l2,
        "relative": l2 / math.sqrt(base) if base else None,
        "tensors": per[:top],
    }


def diff(
    a: ModelVersion,
    b: ModelVersion,
    *,
    registry: Registry,
    state: StateSettings,
    gate: GateSettings,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Everything that tells two versions apart, as JSON-ready data (see module doc).

    Both holdouts are scored as the gate scores them (`flywheel.learner.score`): a row whose
    label a version cannot output counts as wrong for it. Both come from the training
    store (the trusted set's holdout and the recent holdout corrections): without one
    (`engine` None and none at `state`'s database URL) neither is compared; `gate` sizes
    the recent holdout as the gate does.
    """
    history = set(registry.champion_history())
    docs = {v: version_doc(registry.info(v, with_run=True), history) for v in (a, b)}
    store_note = None
    if engine is None:
        engine, store_note = open_store_or_reason(state)
    loaded = {v: registry.load(v) for v in (a, b)}
    sets: list[LabelledSet] = []
    if engine is not None:
        sets += [trusted_holdout(engine, registry.name), recent_holdout(gate, engine)]
    holdouts: dict[str, Any] = {}
    unavailable = {"trusted": store_note, "recent": store_note}
    for hs in sets:
        if hs.name == "trusted" and not len(hs):  # no trusted set: `about` says so
            unavailable["trusted"] = hs.about
            continue
        results = {v: score_on(loaded[v].module, loaded[v].spec, hs) for v in (a, b)}
        entry: dict[str, Any] = {
            "available": True,
            "about": hs.about,
            "n": len(hs),
            "a": score_doc(results[a], hs.labels),
            "b": score_doc(results[b], hs.labels),
        }
        ra, rb = results[a], results[b]
        entry["disagreement"] = (
            disagreement(
                predicted_names(loaded[a].spec, ra), predicted_names(loaded[b].spec, rb), hs.labels
            )
            if ra is not None and rb is not None
            else None
        )
        holdouts[hs.name] = entry
    for name, why in unavailable.items():
        if name not in holdouts:
            holdouts[name] = {
                "available": False,
                "about": why,
                "n": 0,
                "a": None,
                "b": None,
                "disagreement": None,
            }

    def side(v: ModelVersion) -> dict[str, Any]:
        d = docs[v]
        return {k: d[k] for k in LINEAGE_KEYS} | {
            "gate_passed": gate_passed(d),
            "gate_numbers": gate_numbers(d),
            "review": review_of(d),
            "data": version_data(d, engine),
        }

    return {
        "model_name": registry.name,
        "a": side(a),
        "b": side(b),
        "holdouts": holdouts,
        "parameters": parameter_distance(loaded[a], loaded[b]),
        "store": store_note,
    }
