"""Model cards: DIR/model-card-vN.md and its plots (`flywheel models card`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.review.holdouts import trusted_holdout
from flywheel.review.store_views import (
    error_mix,
    open_store_or_reason,
    privacy_ledger,
    version_data,
)
from flywheel.review.versions import (
    epsilon_value,
    gate_numbers,
    gate_passed,
    lineage,
    review_of,
    version_doc,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from flywheel.registry import ModelVersion, Registry
    from flywheel.settings import StateSettings

ALL_TIME_HOURS = 24.0 * 365 * 100
CARD_RUNS = 60  # hops of a lineage whose gate numbers a model card fetches (a query each)
CARD_HOPS = 30  # hops of a lineage a model card lists (the chart shows CARD_RUNS)


@dataclass(frozen=True)
class Card:
    markdown: Path
    plots: list[Path]
    doc: dict[str, Any]


def card(
    version: ModelVersion,
    out_dir: Path,
    *,
    registry: Registry,
    state: StateSettings,
    engine: Engine | None = None,
    hours: float = ALL_TIME_HOURS,
) -> Card:
    """Write DIR/model-card-vN.md and its plots; returns where, and the facts behind it.

    The store is the one at `state`'s database URL unless `engine` is given; the card names
    the holdout of the trusted set there, which the gate's trusted numbers were measured on."""
    history = set(registry.champion_history())
    info = registry.info(version, with_run=True)
    by_version: dict[str, dict[str, Any]] = {
        v.version: version_doc(v, history) for v in registry.versions(with_runs=False)
    }
    doc = version_doc(info, history)
    by_version[info.version] = doc
    chain = lineage(info.version, by_version)
    # the gate numbers of each hop (runs only for the newest hops, not the whole registry)
    for hop in chain[:CARD_RUNS]:
        if not hop["missing"]:
            hop_doc = (
                doc
                if hop["version"] == info.version
                else version_doc(registry.info(hop["version"], with_run=True), history)
            )
            hop["gate_numbers"] = gate_numbers(hop_doc)
            hop["gate_passed"] = gate_passed(hop_doc)
            hop["holdout_accuracy"] = hop_doc["metrics"].get("holdout_accuracy")
    store_note = None
    if engine is None:
        engine, store_note = open_store_or_reason(state)
    errors = None
    if engine is not None:
        report = error_mix(engine, registry.name, hours)
        errors = next((v for v in report["versions"] if v["model_version"] == info.version), None)
    facts = {
        "model_name": registry.name,
        "version": doc,
        "lineage": chain,
        "data": version_data(doc, engine),
        "errors": errors,
        "store": store_note,
        "privacy": privacy_ledger(engine, store_note),
        "trusted": trusted_holdout(engine, registry.name).about if engine else store_note,
    }
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
    lines = [
        f"# Model card: {name} v{d['version']}",
        "",
        "| | |",
        "| --- | --- |",
        f"| status | {_md(d['status'])} |",
        f"| source | {_md(d['source'])} |",
        f"| parent | {_md('v' + d['parent_version'] if d['parent_version'] else None)} |",
        f"| created (UTC) | {_md(d['created_at'])} |",
        f"| MLflow run | {_md(d['run_id'])} |",
        f"| gate | {_md(d['gate'])} |",
    ]
    if review["by"]:
        lines.append(
            f"| review | {_md(review['state'])} by {_md(review['by'])} at "
            f"{_md(review['at'])}: {_md(review['reason'])} |"
        )
    elif review["state"]:
        lines.append(f"| review | {_md(review['state'])} |")
    if tags.get("promoted_at"):
        lines.append(
            f"| promoted | by {_md(tags.get('promoted_by'))} at "
            f"{_md(tags['promoted_at'])}: {_md(tags.get('promotion_reason'))} |"
        )
    if tags.get("rolled_back_at"):
        lines.append(
            f"| rolled back | by {_md(tags.get('rolled_back_by'))} at "
            f"{_md(tags['rolled_back_at'])}: {_md(tags.get('rollback_reason'))} |"
        )
    if tags.get("live_decision"):
        lines.append(f"| live decision | {_md(_live_decision(tags))} |")
    if tags.get("fed_quarantined"):
        lines.append(
            f"| quarantined sites | {_md(tags['fed_quarantined'])} (FLTrust gave their "
            "updates no weight, rounds in a row; not asked again in that run) |"
        )

    chain = f["lineage"]
    names = [f"v{h['version']}" + (" (missing)" if h["missing"] else "") for h in chain]
    if len(names) > 12:
        names = names[:10] + [f"… {len(names) - 11} more …", names[-1]]
    lines += [
        "",
        "## Lineage",
        "",
        " ← ".join(names) + ("" if chain[-1]["missing"] else "  (the first model: no parent)"),
        "",
        "| version | status | source | examples | ε | δ | gate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    shown = chain if len(chain) <= CARD_HOPS else chain[: CARD_HOPS - 1] + chain[-1:]
    for i, h in enumerate(shown):
        if len(shown) < len(chain) and i == len(shown) - 1:
            lines.append(
                f"| … | {len(chain) - len(shown)} more (all: `flywheel models show "
                f"{d['version']} --json`) | | | | | |"
            )
        lines.append(
            f"| v{h['version']} | {_md(h['status'])} | {_md(h['source'])} | "
            f"{_md(h['examples'])} | {_md(h['epsilon'])} | {_md(h['delta'])} | "
            f"{_md(h['gate'])} |"
        )
    if "lineage.png" in plots:
        lines += ["", "![accuracy and ε along the lineage](lineage.png)"]

    data = f["data"]
    lines += ["", "## Data", "", f"- examples tag: {_md(data['examples'])}"]
    if data["range"]:
        lines.append(
            f"- training store ids {data['range'][0]}..{data['range'][1]}: "
            f"{_md(data['total'])} examples, {_md(data['counterexamples'])} of them "
            "counterexamples"
        )
        if data["by_origin"]:
            lines.append(
                "- by origin: " + ", ".join(f"{k} {v}" for k, v in data["by_origin"].items())
            )
        if data["by_split"]:
            lines.append(
                "- by split: " + ", ".join(f"{k} {v}" for k, v in data["by_split"].items())
            )
    elif (data["examples"] or "").startswith("seed"):
        lines.append("- seed data: the platform's own synthetic data, not in the training store")
    if f["store"]:
        lines.append(f"- training store: {_md(f['store'])}")
    lines.append(f"- trusted holdout: {f['trusted']}")

    lines += [
        "",
        "## Gate decisions",
        "",
        "| version | decision | recent (cand / champ) | trusted (cand / champ) | n recent |",
        "| --- | --- | --- | --- | --- |",
    ]
    for h in chain[:CARD_HOPS]:
        if h["missing"]:
            continue
        g = h.get("gate_numbers") or {}
        decision = {True: "passed", False: "rejected", None: "—"}[h.get("gate_passed")]
        if decision == "—" and h["gate"]:
            decision = h["gate"].split(":", 1)[0]
        trusted_c = g.get("gate_trusted_candidate", h.get("holdout_accuracy"))
        n_recent = g.get("gate_recent_n")
        lines.append(
            f"| v{h['version']} | {_md(decision)} | "
            f"{_num(g.get('gate_recent_candidate'))} / "
            f"{_num(g.get('gate_recent_champion'))} | {_num(trusted_c)} / "
            f"{_num(g.get('gate_trusted_champion'))} | "
            f"{_md(None if n_recent is None else int(n_recent))} |"
        )

    lines += [
        "",
        "## Privacy spent",
        "",
        f"- this version: ε = {_md(d['epsilon'])}, δ = {_md(d['delta'])}",
    ]
    spent = [(h["version"], epsilon_value(h["epsilon"])) for h in chain if not h["missing"]]
    private = [(v, e) for v, e in spent if e is not None]
    if private:
        lines.append(
            "- along the lineage (newest first): "
            + ", ".join(f"v{v} ε={e:g}" for v, e in private[:CARD_HOPS])
            + (f", … ({len(private) - CARD_HOPS} more)" if len(private) > CARD_HOPS else "")
        )
    else:
        lines.append(
            "- no version in the lineage reports an ε (trained on the platform's own "
            "data, or before privacy accounting)"
        )
    ledger = f["privacy"]
    mine = [e for e in ledger["versions"] if e["version"] == d["version"]]
    for e in mine:
        lines.append(
            f"- privacy ledger, update {e['update']} of {_md(e['lineage'])}: "
            f"ε {_num(e['epsilon_update'])} for this update, "
            f"{_num(e['epsilon_lineage'])} for the lineage so far "
            f"({e['sources']} sources, {e['examples']} examples)"
        )
    excluded = ledger.get("excluded")
    if excluded and excluded["incoming_examples"]:
        lines.append(
            f"- incoming data the privacy budget keeps out: {excluded['excluded_examples']} of "
            f"{excluded['incoming_examples']} trainable examples "
            f"({excluded['excluded_share']:.1%}): their privacy unit's budget is spent"
        )
    used = [s for s in ledger["sources"] if d["version"] in s["versions"]]
    if used:
        lines += [
            "",
            "ε per privacy unit (data subject, else prediction) that trained this "
            "version, cumulative over the units' updates:",
            "",
            "| unit | ε spent | updates | examples |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_md(s['source'])} | {_num(s['epsilon'])} | {s['updates']} | {s['examples']} |"
            for s in used
        ]
    elif ledger["note"]:
        lines.append(f"- per source: {ledger['note']}")
    else:
        lines.append("- per source: no source of this version is in the privacy ledger")

    lines += ["", "## Known error types", ""]
    errors = f["errors"]
    if errors is None or not errors["corrections"]:
        lines.append(
            "No corrections of predictions served by this version are in the store yet."
            if f["store"] is None
            else f"Unknown: {_md(f['store'])}."
        )
    else:
        lines += [
            f"{errors['corrections']} corrected predictions of v{d['version']}, "
            f"{errors['errors']} wrong (error rate {errors['error_rate']:.1%}).",
            "",
            "| error type | count |",
            "| --- | --- |",
        ]
        lines += [f"| {_md(k)} | {v} |" for k, v in errors["error_types"].items()]
        if errors["confusions"]:
            lines += ["", "| predicted | actual | count |", "| --- | --- | --- |"]
            lines += [
                f"| {_md(c['predicted'])} | {_md(c['actual'])} | {c['count']} |"
                for c in errors["confusions"]
            ]
        if "errors.png" in plots:
            lines += ["", "![error types](errors.png)"]
    lines += [
        "",
        "Error types: `confident` (wrong with a high margin), `boundary` (low margin), "
        "`novel` (far from the training data), `suspect` (a correction that contradicts "
        "a confident model and its labelled neighbours; quarantined). See docs/feedback.md.",
        "",
    ]
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
        trusted = [
            (h.get("gate_numbers") or {}).get("gate_trusted_candidate", h.get("holdout_accuracy"))
            for h in hops
        ]
        recent = [(h.get("gate_numbers") or {}).get("gate_recent_candidate") for h in hops]
        eps = [epsilon_value(h["epsilon"]) for h in hops]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(xs) + 2), 3.4))
        for values, label, marker in (
            (trusted, "trusted holdout", "o"),
            (recent, "recent holdout", "s"),
        ):
            pts = [(i, v) for i, v in enumerate(values) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for i, h in enumerate(hops):
            if h.get("gate_passed") is False:
                ax.axvline(i, color="tab:red", alpha=0.15, linewidth=6)
        ax.set_xticks(range(len(xs)), xs, rotation=45 if len(xs) > 12 else 0, fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{f['model_name']}: lineage of v{f['version']['version']} (red: gate rejected)",
            fontsize=9,
        )
        if any(e is not None for e in eps):
            ax2 = ax.twinx()
            ax2.bar(
                range(len(xs)), [e or 0.0 for e in eps], alpha=0.2, color="tab:purple", label="ε"
            )
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
        ax.set_title(
            f"error types of v{f['version']['version']} "
            f"({errors['errors']} of {errors['corrections']} wrong)",
            fontsize=9,
        )
        fig.tight_layout()
        written.append(out_dir / "errors.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _live_decision(tags: dict[str, str]) -> str:
    """The live judge's verdict on this version (tags `live_decision`, `live_evidence`,
    learner/live.py) in one line: what it decided and what that rests on. `held` is a
    verdict recorded but not acted on (auto-promotion off): the reviewer's to act on.

    >>> _live_decision({"live_decision": "held", "live_evidence": '{"pair": "shadow:4:3",'
    ...     ' "decision": "candidate", "labels": 420, "candidate_only_right": 61,'
    ...     ' "champion_only_right": 30, "accuracy_difference": 0.0738,'
    ...     ' "log_evidence": 3.4, "threshold": 3.0, "alpha": 0.05}'})
    ... # doctest: +NORMALIZE_WHITESPACE
    'held (shadow:4:3): candidate better on 420 paired labels (alone right 61 vs 30,
    accuracy +0.074); log evidence 3.40 >= 3.00 (alpha 0.05)'
    """
    try:
        ev = json.loads(tags.get("live_evidence") or "{}")
    except ValueError:
        ev = {}
    if not isinstance(ev, dict) or "labels" not in ev:
        return tags["live_decision"]
    pair = f" ({ev['pair']})" if ev.get("pair") else ""
    return (
        f"{tags['live_decision']}{pair}: {ev.get('decision') or 'no'} better on "
        f"{ev['labels']} paired labels (alone right {ev.get('candidate_only_right')} vs "
        f"{ev.get('champion_only_right')}, "
        f"accuracy {float(ev.get('accuracy_difference', 0)):+.3f}); "
        f"log evidence {float(ev.get('log_evidence', 0)):.2f} >= "
        f"{float(ev.get('threshold', 0)):.2f} (alpha {ev.get('alpha')})"
    )
