"""`flywheel monitor`: how each version does on live traffic, while labels arrive late.

Reads the training store only (`flywheel.review.live_report`): per version, live accuracy
with its Wilson 95 % interval, log-loss, label delay, the unlabelled and missing shares,
CBPE (the accuracy the model's own confidence predicts, next to the realised one), and
input drift (PSI against the trusted data); `--segment FEATURE` splits them per category
or quartile. What each number means: docs/monitoring.md. `--json` gives the same document
to scripts, and nothing else on stdout.
"""

from __future__ import annotations

import json
import math
from typing import Any

import typer

from flywheel.cli import app, settings_or_exit
from flywheel.cli.tables import print_table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _secs(value: float | None) -> str:
    """A duration the way a person reads it (s, min, h, d)."""
    if value is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} s"


def _interval(doc: dict[str, Any]) -> str:
    if doc["accuracy"] is None:
        return "—"
    return f"{_pct(doc['accuracy'])} [{_pct(doc['accuracy_low'])}, {_pct(doc['accuracy_high'])}]"


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d = doc["label_delay"]
    console.print(
        f"{doc['model_name']}: the last {_secs(doc['window_s'])} up to {doc['now'][:19]} UTC; "
        f"label delay p50 {_secs(d['p50_s'])}, p90 {_secs(d['p90_s'])} "
        f"(over {d['n']} labels; a prediction younger than p90 is pending, not missing)",
        highlight=False,
    )
    if not doc["versions"]:
        console.print("no prediction, score or label in this window", highlight=False)
        return
    table = Table(title="live accuracy per version")
    for col in (
        "version",
        "labels",
        "accuracy [95 % CI]",
        "log-loss",
        "CBPE labelled",
        "CBPE - acc",
        "delay p50 / p90 / max",
        "served",
        "unlabelled",
        "missing",
        "CBPE unlabelled",
        "max PSI",
    ):
        table.add_column(col, justify="left" if col == "version" else "right")
    for v in doc["versions"]:
        ld, drift = v["label_delay"], v["drift"]
        psi = (
            "—"
            if drift["max_psi"] is None
            else f"{drift['max_psi']:.3f} {drift['max_feature']} ({drift['level']})"
        )
        roles = [r for r in v["served_as"] if r != "answered"]
        table.add_row(
            f"v{v['version']}" + (f" ({', '.join(roles)})" if roles else ""),
            str(v["labelled"]),
            _interval(v),
            _num(v["log_loss"]),
            _num(v["cbpe_labelled"]),
            _num(v["calibration_gap"], 3) if v["calibration_gap"] is not None else "—",
            f"{_secs(ld['p50_s'])} / {_secs(ld['p90_s'])} / {_secs(ld['max_s'])}",
            str(v["served"]),
            _pct(v["unlabelled_share"]),
            _pct(v["missing_share"]),
            _num(v["cbpe_unlabelled"]),
            psi,
        )
    print_table(console, table)
    drifted = Table(
        title=f"input drift (PSI against the trusted data; "
        f"≥ {doc['psi_thresholds']['moderate']} moderate, "
        f"≥ {doc['psi_thresholds']['major']} major)"
    )
    for col in ("version", "feature", "kind", "PSI", "reading"):
        drifted.add_column(col, justify="right" if col == "PSI" else "left")
    for v in doc["versions"]:
        for f in v["drift"]["features"]:
            if f["psi"] is not None and f["level"] != "stable":
                cells = (f["name"], f["kind"], _num(f["psi"]), f["level"])
                drifted.add_row(f"v{v['version']}", *cells)
    if drifted.row_count:
        print_table(console, drifted)
    notes = {v["drift"]["note"] for v in doc["versions"] if v["drift"]["note"]}
    for note in sorted(notes):
        console.print(f"note: {note}", highlight=False, markup=False)
    if doc["segment"] is None:
        return
    seg = Table(
        title=f"per segment of {doc['segment']} (the newest {doc['sample']} rows per version)"
    )
    for col in (
        "version",
        "segment",
        "rows",
        "labels",
        "accuracy [95 % CI]",
        "CBPE labelled",
        "CBPE unlabelled",
        "unlabelled",
    ):
        seg.add_column(col, justify="left" if col in ("version", "segment") else "right")
    for v in doc["versions"]:
        for s in v.get("segments", []):
            seg.add_row(
                f"v{v['version']}",
                s["segment"],
                str(s["rows"]),
                str(s["labelled"]),
                _interval(s),
                _num(s["cbpe_labelled"]),
                _num(s["cbpe_unlabelled"]),
                _pct(s["unlabelled_share"]),
            )
    print_table(console, seg)


def _clean(value: Any) -> Any:
    """The document as strict JSON: a NaN or infinity (none is expected) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@app.command()
def monitor(
    window: str | None = typer.Option(
        None,
        "--window",
        help="How far back: 30m, 24h, 7d, ... (default: FLYWHEEL_LIVE_MONITOR_WINDOW_S).",
    ),
    segment: str | None = typer.Option(
        None,
        "--segment",
        help="A feature: the numbers per category (categorical, boolean) or per quartile "
        "of the trusted data (numeric).",
    ),
    sample: int | None = typer.Option(
        None,
        "--sample",
        min=100,
        max=1_000_000,
        help="Rows read per version for delays, CBPE, drift and segments (default: "
        "FLYWHEEL_LIVE_MONITOR_SAMPLE).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Live accuracy per version with its 95 % interval, label delay, unlabelled share,
    CBPE and input drift, from the training store (docs/monitoring.md)."""
    from flywheel.review import live_report, open_store_or_reason, parse_window

    settings = settings_or_exit()
    try:
        window_s = (
            parse_window(window) if window is not None else settings.gate.live_monitor_window_s
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--window") from None
    engine, why = open_store_or_reason(settings.state)
    if engine is None:
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(1)
    try:
        doc = live_report(
            engine,
            settings.registry.model_name,
            window_s=window_s,
            segment=segment,
            sample=sample or settings.gate.live_monitor_sample,
        )
    except ValueError as exc:  # an unknown segment feature
        raise typer.BadParameter(str(exc), param_hint="--segment") from None
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(_clean(doc), indent=2, allow_nan=False))
    else:
        _print(doc)
