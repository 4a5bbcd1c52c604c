"""`flywheel models`: review, promote and roll back the versions in the model registry, and
run candidates beside the champion (`shadow`, `canary`; docs/serving.md).

MLOps engineers decide here what the service serves, so the output says plainly which
version is champion, where each one came from (source, parent, examples, privacy spent) and
what its gate decided. `--json` gives scripts the same facts, with stable keys, and nothing
else on stdout. Registry access is imported lazily: `flywheel --help` must not load torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from flywheel.cli import app, finite_hours, settings_or_exit
from flywheel.cli.tables import print_table
from flywheel.settings import mask_credentials

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from flywheel.events import ModelEvent
    from flywheel.registry import ModelVersion, Registry, VersionInfo
    from flywheel.settings import Settings

models_app = typer.Typer(
    name="models",
    no_args_is_help=True,
    help="Review model versions (metrics, privacy spent, lineage), promote and roll back, "
    "shadow and canary.",
)
app.add_typer(models_app, name="models")

_VERSION = re.compile(r"^[vV]?([1-9][0-9]{0,17})$")
# (label, metric names in order of preference): the learner's gate metrics first, then the
# seed model's `holdout_accuracy`, which is measured on the same trusted seed holdout.
_KEY_METRICS = (
    ("recent", ("gate_recent_candidate", "recent_accuracy", "recent_holdout_accuracy")),
    (
        "trusted",
        (
            "gate_trusted_candidate",
            "trusted_accuracy",
            "trusted_holdout_accuracy",
            "holdout_accuracy",
        ),
    ),
)
GATE_MIN_WIDTH = 24  # the tables cut the gate to the terminal's width; `show` prints it whole
PIPED_WIDTH = 160
LINEAGE_SHOWN = 20  # rows of lineage `show` prints; --json has every hop


# --- arguments and errors -------------------------------------------------------------------


def _version_arg(value: str) -> str:
    """Accept `3` or `v3` (as the tables print it); anything else is a usage error (exit 2).

    Typer passes on text; a command turns it into a `ModelVersion` with `_version`."""
    match = _VERSION.match(value.strip())
    if match is None:
        raise typer.BadParameter(f"expected a version number such as 3 or v3, got {value!r}")
    return match.group(1)


def _version(text: str) -> ModelVersion:
    """A version argument (already checked by `_version_arg`) as the registry's type."""
    from flywheel.registry import parse_version

    return parse_version(text)


def _reason_arg(value: str) -> str:
    """A promotion or rollback is audited by its reason: a blank one is refused."""
    from flywheel.review import ReviewError, check_reason

    try:
        return check_reason(value)
    except ReviewError as exc:
        raise typer.BadParameter(str(exc)) from None


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(1)


@contextmanager
def _registry_errors(settings: Settings) -> Iterator[None]:
    """Unknown versions, nothing to undo and an unusable MLflow store: one line, exit 1."""
    from mlflow.exceptions import MlflowException

    from flywheel.registry import RegistryError
    from flywheel.review import ReviewError
    from flywheel.signing import SigningKeyError

    where = f"MLflow registry at {mask_credentials(settings.resolved_mlflow_uri)}"
    try:
        yield
    except (RegistryError, ReviewError) as exc:
        _fail(str(exc))
    except SigningKeyError as exc:
        _fail(f"cannot sign the promotion: {exc} (FLYWHEEL_SIGNING_KEY, docs/security.md)")
    except MlflowException as exc:
        _fail(f"{where}: {exc.message}")
    except OSError as exc:
        _fail(f"{where}: {exc}")


def _open(settings: Settings) -> Registry:
    import os

    from flywheel.registry import Registry

    # someone is waiting at a terminal: an unreachable MLflow server fails in seconds, not
    # after MLflow's default 7 retries with backoff (~4 minutes a call); env still wins
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return Registry.of(settings)


# --- versions as plain data (what --json prints) ---------------------------------------------


def _as_dict(info: VersionInfo, history: AbstractSet[ModelVersion]) -> dict[str, Any]:
    """One version as JSON-ready data; every key is always there (null when unknown)."""
    from flywheel.review import version_doc

    return version_doc(info, history)


def _lineage(version: str, by_version: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The version, its parent, ... down to a version without one (see `review.lineage`)."""
    from flywheel.review import lineage

    return lineage(version, by_version)


def _key_metrics(metrics: dict[str, float | None]) -> list[float | None]:
    """The recent and trusted holdout accuracies for the list table (None: not logged)."""
    out: list[float | None] = []
    for _, names in _KEY_METRICS:
        name = next((n for n in names if n in metrics), None)
        out.append(None if name is None else metrics[name])
    return out


def _json_out(doc: object) -> None:
    typer.echo(json.dumps(doc, indent=2, allow_nan=False))


# --- rendering -------------------------------------------------------------------------------


def _console() -> Console:
    """The terminal's own width; a wide one when piped, rather than rich's squeezed 80."""
    import os

    from rich.console import Console

    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=PIPED_WIDTH)


def _short_status(doc: dict[str, Any]) -> str:
    """★ champion, former, ... and the live roles the version holds (`models list`)."""
    if doc["champion"]:
        status = "★ champion"
    else:
        status = {"candidate": "", "former champion": "former"}.get(doc["status"], doc["status"])
    roles = " ".join(doc.get("roles") or [])
    return f"{status} · {roles}" if status and roles else status or roles


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _when(iso: str | None, seconds: bool = False) -> str:
    return "" if iso is None else iso.replace("T", " ")[: 19 if seconds else 16]


def _fitted_table(
    console: Console,
    title: str,
    columns: list[tuple[str, bool]],
    rows: list[list[str]],
    gates: list[str],
    caption: str = "",
) -> Table:
    """A table whose facts never wrap; the gate (free text) gets the width that is left.

    `columns` are (header, numeric). In a terminal too narrow for that, words wrap
    instead: a number cut to `0.9…` would mislead a reviewer.
    """
    from rich.measure import Measurement

    facts = _table(title, caption, columns, rows)
    gate_width = console.width - Measurement.get(console, console.options, facts).maximum - 2
    narrow = gate_width < GATE_MIN_WIDTH
    if narrow:  # a few wrapped lines of it at most
        limit = 2 * GATE_MIN_WIDTH
        gates = [g if len(g) <= limit else g[: limit - 1] + "…" for g in gates]
    rows = [row + [gate] for row, gate in zip(rows, gates, strict=True)]
    return _table(
        title, caption, columns, rows, gate="wrap" if narrow else "cut", gate_width=gate_width
    )


def _table(
    title: str,
    caption: str,
    columns: list[tuple[str, bool]],
    rows: list[list[str]],
    gate: str = "",
    gate_width: int = 0,
) -> Table:
    """`gate` is "" (no gate column), "cut" (one line, ellipsis) or "wrap" (narrow terminal).

    Cells are plain `Text`: tag values are free text, and `[urgent]` in a reason is not markup.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=Text(title),
        caption=caption or None,
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        title_justify="left",
        caption_justify="left",
    )
    for name, numeric in columns:
        table.add_column(
            name,
            justify="right" if numeric else "left",
            no_wrap=numeric or gate != "wrap",
            overflow="fold",
        )
    if gate == "cut":
        table.add_column("gate", no_wrap=True, overflow="ellipsis", max_width=gate_width)
    elif gate == "wrap":
        table.add_column("gate", overflow="fold", min_width=GATE_MIN_WIDTH // 2)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _print_versions(docs: list[dict[str, Any]], title: str, console: Console) -> None:
    columns = [
        ("version", True),
        ("status", False),
        ("source", False),
        ("parent", True),
        ("examples", False),
        ("ε", True),
        *((f"{label}\nacc", True) for label, _ in _KEY_METRICS),
        ("created (UTC)", False),
    ]
    rows = [
        [
            f"v{d['version']}",
            _short_status(d),
            d["source"] or "",
            f"v{d['parent_version']}" if d["parent_version"] else "—",
            d["examples"] or "",
            d["epsilon"] or "",
            *(_number(v) for v in _key_metrics(d["metrics"])),
            _when(d["created_at"]),
        ]
        for d in docs
    ]
    print_table(
        console,
        _fitted_table(
            console,
            title,
            columns,
            rows,
            [d["gate"] or "" for d in docs],
            caption="details: flywheel models show VERSION",
        ),
    )


def _print_version(doc: dict[str, Any], console: Console) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    marker = "★ champion" if doc["champion"] else doc["status"]
    console.print(
        f"[bold]{escape(doc['model_name'])} v{doc['version']}[/bold]  {marker}", highlight=False
    )
    console.print(
        f"created {_when(doc['created_at'], seconds=True)} UTC, run {doc['run_id'] or 'none'}",
        highlight=False,
    )
    metrics = {k: "n/a" if v is None else f"{v:.6g}" for k, v in doc["metrics"].items()}
    for title, values in (("tags", doc["tags"]), ("params", doc["params"]), ("metrics", metrics)):
        if not values:
            console.print(f"\n{title}: none", highlight=False)
            continue
        table = Table(
            title=title,
            title_justify="left",
            show_header=False,
            box=box.SIMPLE,
            collapse_padding=True,
        )
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in values.items():
            table.add_row(Text(name), Text(str(value)))
        print_table(console, table)
    hops = doc["lineage"]
    columns = [
        ("version", True),
        ("status", False),
        ("source", False),
        ("examples", False),
        ("ε", True),
        ("δ", True),
        ("created (UTC)", False),
    ]
    rows = [
        [
            f"v{h['version']}",
            _short_status(h) or "candidate",
            h["source"] or "",
            h["examples"] or "",
            h["epsilon"] or "",
            h["delta"] or "",
            _when(h["created_at"]),
        ]
        for h in hops
    ]
    gates = [h["gate"] or "" for h in hops]
    title = f"lineage: v{doc['version']}, its parent, ... down to the first model"
    if len(hops) > LINEAGE_SHOWN:  # an online learner's chain grows by one every update
        hidden = len(hops) - LINEAGE_SHOWN + 1
        rows = rows[: LINEAGE_SHOWN - 2] + [["…", f"{hidden} more", *[""] * 5]] + rows[-1:]
        gates = gates[: LINEAGE_SHOWN - 2] + ["(all of them: --json)"] + gates[-1:]
        title += f" ({len(hops)} versions)"
    print_table(console, _fitted_table(console, title, columns, rows, gates))


# --- commands --------------------------------------------------------------------------------


@models_app.command("list")
def list_versions(
    limit: int = typer.Option(20, "--limit", "-n", min=0, help="Newest N versions; 0: all."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (a list) and nothing else."),
) -> None:
    """Versions, newest first: champion and live roles (shadow, canary, guard), source,
    parent, examples, epsilon, accuracy, gate."""
    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        history = set(registry.champion_history())
        listed = registry.versions(with_runs=False)
        # A run (params, metrics) costs a query: fetch runs only for the versions shown.
        shown = [
            registry.info(v.version, with_run=True) for v in (listed[:limit] if limit else listed)
        ]
        held = registry.roles()  # one read: shadow, canary, guard (issue 28)
    docs = [
        _as_dict(info, history)
        | {"roles": sorted(r for r, v in held.items() if v == info.version and r != "champion")}
        for info in shown
    ]
    hint = (
        f"no versions of {registry.name!r} in {mask_credentials(settings.resolved_mlflow_uri)} "
        "yet: `flywheel serve` or `flywheel demo` trains and registers a seed model on "
        "first start"
    )
    if as_json:
        _json_out(docs)
        if not docs:
            typer.echo(hint, err=True)
        return
    champion = next((v.version for v in listed if v.is_champion), None)
    console = _console()
    _print_versions(
        docs,
        f"{registry.name}: {len(docs)} of {len(listed)} versions, newest "
        f"first; champion {'v' + champion if champion else 'none'}",
        console,
    )
    if not docs:
        from rich.text import Text

        console.print(Text(hint))


@models_app.command()
def show(
    version: str = typer.Argument(
        ..., callback=_version_arg, metavar="VERSION", help="Version number (3 or v3)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Every tag, param and metric of one version, and its lineage down to the first model."""
    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        info = registry.info(_version(version), with_run=True)
        history = set(registry.champion_history())
        # One query for every version: a long online-learning chain is walked in memory.
        by_version: dict[str, dict[str, Any]] = {
            v.version: _as_dict(v, history) for v in registry.versions(with_runs=False)
        }
    doc = _as_dict(info, history) | {"model_name": registry.name}
    by_version[info.version] = doc
    doc["lineage"] = _lineage(info.version, by_version)
    if as_json:
        _json_out(doc)
    else:
        _print_version(doc, _console())


@models_app.command()
def promote(
    version: str = typer.Argument(
        ..., callback=_version_arg, metavar="VERSION", help="Version number (3 or v3)."
    ),
    reason: str = typer.Option(
        "manual promotion",
        "--reason",
        "-r",
        callback=_reason_arg,
        help="Recorded on the version and in the model event.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Make VERSION the champion (alias `champion`) and announce it on the model-events topic."""
    from flywheel import promotion

    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        target = registry.info(_version(version), with_run=False)
        if target.is_champion:
            message = f"{registry.name} v{version} is already the champion; nothing changed"
            if as_json:
                doc = {"changed": False, "model_name": registry.name, "version": version}
                _json_out(doc | {"message": message})
            else:
                typer.echo(message)
            return
        gate = target.tags.get("gate", "")
        if gate.lower().startswith("rejected"):
            typer.echo(
                f"warning: v{version} did not pass its gate ({gate}); promoting anyway", err=True
            )
        event = promotion.promote(
            settings.kafka, target.version, reason=reason, registry=registry, notify=False
        )
    was = f"v{event.previous_version}" if event.previous_version else "no champion"
    _report_move(
        settings,
        event,
        f"promoted {event.model_name} v{event.version} to champion (was {was}); "
        f"by {event.actor}: {event.reason}",
        as_json,
    )


@models_app.command()
def rollback(
    reason: str = typer.Option(
        "manual rollback",
        "--reason",
        "-r",
        callback=_reason_arg,
        help="Recorded on the version rolled back and in the event.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Move the champion back to the one before it (repeat to go further back)."""
    from flywheel import promotion

    settings = settings_or_exit()
    with _registry_errors(settings):
        event = promotion.rollback(
            settings.kafka, reason=reason, registry=_open(settings), notify=False
        )
    _report_move(
        settings,
        event,
        f"rolled {event.model_name} back from v{event.previous_version} to "
        f"v{event.version}; by {event.actor}: {event.reason}",
        as_json,
    )


def _optional_version_arg(value: str | None) -> str | None:
    return None if value is None else _version_arg(value)


def _role_command(role: str, version: str | None, stop: bool, reason: str, as_json: bool) -> None:
    """Make VERSION the `role`, or (--stop) end the role; announce it as a promotion is."""
    from flywheel import promotion

    if version is None and not stop:
        raise typer.BadParameter(f"give the VERSION to run as the {role}, or --stop")
    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        held = registry.role_version(role)
        if stop:
            if version is not None and held != version:
                now = f"v{held}" if held is not None else "nobody"
                _fail(f"{registry.name} v{version} is not the {role} ({now} is); nothing changed")
            event = promotion.clear_role(
                settings.kafka, role, reason=reason, registry=registry, notify=False
            )
            if event is None:
                _unchanged(registry.name, None, f"{registry.name} has no {role}", as_json)
                return
            message = (
                f"{event.model_name} v{event.previous_version} is no longer the {role}; "
                f"by {event.actor}: {event.reason}"
            )
        else:
            assert version is not None
            target = registry.info(_version(version), with_run=False)  # unknown: an error
            if held == target.version:
                message = f"{registry.name} v{version} is already the {role}"
                _unchanged(registry.name, version, message, as_json)
                return
            event = promotion.set_role(
                settings.kafka, target.version, role, reason=reason, registry=registry, notify=False
            )
            was = f"v{event.previous_version}" if event.previous_version else f"no {role}"
            message = (
                f"{event.model_name} v{event.version} is the {role} (was {was}); "
                f"by {event.actor}: {event.reason}"
            )
    _report_move(settings, event, message, as_json)


def _unchanged(model_name: str, version: str | None, message: str, as_json: bool) -> None:
    message = f"{message}; nothing changed"
    if as_json:
        _json_out(
            {"changed": False, "model_name": model_name, "version": version} | {"message": message}
        )
    else:
        typer.echo(message)


_ROLE_VERSION = typer.Argument(
    None,
    callback=_optional_version_arg,
    metavar="[VERSION]",
    help="Version number (3 or v3); with --stop, optional (checked to be the one running).",
)


@models_app.command()
def shadow(
    version: str | None = _ROLE_VERSION,
    stop: bool = typer.Option(False, "--stop", help="Stop running the shadow."),
    reason: str = typer.Option(
        "manual shadow",
        "--reason",
        "-r",
        callback=_reason_arg,
        help="Recorded on the version and in the model event.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Run VERSION as the shadow (alias `shadow`): it scores a share of requests off the
    request path (FLYWHEEL_LIVE_SHADOW_SHARE); clients never see its answers."""
    _role_command("shadow", version, stop, reason, as_json)


@models_app.command()
def canary(
    version: str | None = _ROLE_VERSION,
    stop: bool = typer.Option(False, "--stop", help="Stop running the canary."),
    reason: str = typer.Option(
        "manual canary",
        "--reason",
        "-r",
        callback=_reason_arg,
        help="Recorded on the version and in the model event.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Run VERSION as the canary (alias `canary`): it answers a share of routing keys
    (FLYWHEEL_LIVE_CANARY_SHARE; header X-Flywheel-Routing-Key), the champion the rest."""
    _role_command("canary", version, stop, reason, as_json)


def _report_move(settings: Settings, event: ModelEvent, message: str, as_json: bool) -> None:
    """Announce a promotion or rollback and say what happened: two lines, or one JSON object
    (the event's fields, `changed`, `announced` and both messages)."""
    announced, how = _announce(settings, event)
    if as_json:
        doc = event.model_dump(mode="json") | {
            "changed": True,
            "announced": announced,
            "message": message,
            "services": how,
        }
        _json_out(doc)
        return
    typer.echo(message)
    typer.echo(how)


def _announce(settings: Settings, event: ModelEvent) -> tuple[bool | None, str]:
    """Send the event if Kafka is configured: whether it was sent (None: no Kafka) and what
    that means for the services."""
    from flywheel.promotion import announce

    what = "the change" if event.version == "none" else f"v{event.version}"
    polling = (
        f"services pick up {what} when they next poll the registry "
        f"(every {settings.registry_poll_s:g} s)"
    )
    if not settings.kafka_bootstrap:
        return None, f"no model event sent (FLYWHEEL_KAFKA_BOOTSTRAP is not set): {polling}"
    if announce(settings.kafka, event):
        return True, f"announced on {settings.topic_model_events}: services swap now"
    return False, (
        f"could not announce on {settings.topic_model_events} (see the warning above): {polling}"
    )


# --- review: diff, card, pending, approve, reject ----------------------------------------------


def _signed(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{b - a:+.3f}"


def _print_diff(doc: dict[str, Any], console: Console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    a, b = doc["a"], doc["b"]
    va, vb = f"v{a['version']}", f"v{b['version']}"
    console.print(Text(f"{doc['model_name']}: {va} → {vb}", style="bold"))
    facts = Table(box=box.SIMPLE_HEAD, collapse_padding=True, show_header=True)
    facts.add_column("")
    facts.add_column(va, overflow="fold")
    facts.add_column(vb, overflow="fold")

    def data(side: dict[str, Any]) -> str:
        d = side["data"]
        if d["range"] is None:
            return "—"
        return (
            f"ids {d['range'][0]}..{d['range'][1]}: {d['total']} examples, "
            f"{d['counterexamples']} counterexamples"
            if d["total"] is not None
            else f"ids {d['range'][0]}..{d['range'][1]} (store not available)"
        )

    def review(side: dict[str, Any]) -> str:
        r = side["review"]
        return f"{r['state']} by {r['by']}: {r['reason']}" if r["by"] else (r["state"] or "—")

    rows = [
        ("status", lambda s: _short_status(s) or "candidate"),
        ("source", lambda s: s["source"] or "—"),
        ("parent", lambda s: f"v{s['parent_version']}" if s["parent_version"] else "—"),
        ("examples", lambda s: s["examples"] or "—"),
        ("training data", data),
        ("ε / δ", lambda s: f"{s['epsilon'] or '—'} / {s['delta'] or '—'}"),
        ("gate", lambda s: s["gate"] or "—"),
        ("review", review),
    ]
    for label, get in rows:
        facts.add_row(Text(label, style="bold"), Text(get(a)), Text(get(b)))
    print_table(console, facts)

    for name, h in doc["holdouts"].items():
        if not h["available"]:
            console.print(Text(f"\n{name} holdout: not available ({h['about']})"))
            continue
        console.print(Text(f"\n{name} holdout: {h['about']}", style="bold"))
        table = Table(box=box.SIMPLE_HEAD, collapse_padding=True)
        for col in ("", va, vb, "change"):
            table.add_column(col, justify="left" if col == "" else "right")
        for metric in ("accuracy", "log_loss"):
            x, y = h["a"][metric], h["b"][metric]
            table.add_row(metric.replace("_", "-"), _number(x), _number(y), _signed(x, y))
        print_table(console, table)
        for side, v in ((h["a"], va), (h["b"], vb)):
            if side.get("note"):
                console.print(Text(f"  {v}: {side['note']}"))
        dis = h["disagreement"]
        if dis is None or not dis["n"]:
            continue
        console.print(
            Text(
                f"  disagree on {dis['share']:.1%} of {dis['n']} inputs: {dis['fixed']} fixed "
                f"(wrong in {va}, right in {vb}), {dis['broken']} broken"
            )
        )
        if dis["changed_confusions"]:
            console.print(
                Text(
                    "  confusions that changed (predicted→actual: "
                    f"{va} → {vb}): "
                    + ", ".join(
                        f"{c['predicted']}→{c['actual']} {c['a']}→{c['b']}"
                        for c in dis["changed_confusions"]
                    )
                )
            )
    p = doc["parameters"]
    if p["comparable"]:
        rel = f" ({p['relative']:.1%} of {va}'s norm)" if p["relative"] is not None else ""
        moved = ", ".join(f"{t['tensor']} {t['l2']:.3g}" for t in p["tensors"][:3] if t["l2"])
        console.print(
            Text(
                f"\nparameters: L2 distance {p['l2']:.4g}{rel}"
                + (f"; moved most: {moved}" if moved else "")
            )
        )
    else:
        console.print(Text(f"\nparameters: not comparable ({p['reason']})"))
    if doc["store"]:
        console.print(Text(f"note: {doc['store']}"))


@models_app.command()
def diff(
    a: str = typer.Argument(..., callback=_version_arg, metavar="A", help="Version (3 or v3)."),
    b: str = typer.Argument(..., callback=_version_arg, metavar="B", help="Version (3 or v3)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Compare two versions: both holdouts, where they disagree, gate, ε/δ, data, weights."""
    from flywheel import review

    settings = settings_or_exit()
    with _registry_errors(settings):
        doc = review.diff(
            _version(a),
            _version(b),
            registry=_open(settings),
            state=settings.state,
            gate=settings.gate,
        )
    if as_json:
        _json_out(doc)
    else:
        _print_diff(doc, _console())


@models_app.command()
def card(
    version: str = typer.Argument(
        ..., callback=_version_arg, metavar="VERSION", help="Version number (3 or v3)."
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        metavar="DIR",
        help="Folder for the card; default FLYWHEEL_HOME/cards/vN.",
    ),
    hours: float = typer.Option(
        24.0 * 365,
        callback=finite_hours,
        help="Window of the feedback error reports it summarizes.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Write a model card (markdown + plots): lineage, data, gates, privacy, error types."""
    from pathlib import Path

    from flywheel import review

    settings = settings_or_exit()
    folder = Path(out) if out else settings.home_dir / "cards" / f"v{version}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--out {folder}: cannot create the folder ({exc.strerror or exc})")
    with _registry_errors(settings):
        written = review.card(
            _version(version),
            folder,
            registry=_open(settings),
            state=settings.state,
            hours=hours,
        )
    if as_json:
        plots = [str(p) for p in written.plots]
        _json_out({"version": version, "markdown": str(written.markdown), "plots": plots})
        return
    typer.echo(f"wrote {written.markdown}")
    for plot in written.plots:
        typer.echo(f"wrote {plot}")


@models_app.command()
def pending(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (a list) and nothing else."),
) -> None:
    """Candidates that passed their gate and wait for a reviewer (auto-promotion off)."""
    from flywheel import review

    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        docs = [
            _as_dict(registry.info(d["version"], with_run=True), set(registry.champion_history()))
            for d in review.pending(registry)
        ]
        champion = registry.champion_version()
    if as_json:
        _json_out(docs)
        return
    console = _console()
    if not docs:
        hint = (
            ""
            if not settings.auto_promote
            else " (FLYWHEEL_AUTO_PROMOTE is on: the learner promotes passed candidates itself)"
        )
        typer.echo(f"no candidates of {registry.name!r} wait for review{hint}")
        return
    _print_versions(
        docs,
        f"{registry.name}: {len(docs)} pending review, oldest first; "
        f"champion {'v' + champion if champion else 'none'}",
        console,
    )
    typer.echo(
        "decide: flywheel models approve VERSION --reason TEXT | reject VERSION --reason TEXT"
    )


def _by_arg(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("--by must not be empty")
    return value.strip() if value else None


@models_app.command()
def approve(
    version: str = typer.Argument(
        ..., callback=_version_arg, metavar="VERSION", help="Version number (3 or v3)."
    ),
    reason: str = typer.Option(
        ...,
        "--reason",
        "-r",
        callback=_reason_arg,
        help="Why: recorded on the version and in the model event.",
    ),
    by: str | None = typer.Option(
        None, "--by", callback=_by_arg, help="Who decides; default: your user name."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Approve a pending candidate: it becomes the champion (announced) and the review is
    recorded as tags review=approved, review_by, review_reason, review_at."""
    from flywheel import review

    settings = settings_or_exit()
    with _registry_errors(settings):
        event = review.approve(
            _version(version),
            reason=reason,
            actor=by,
            registry=_open(settings),
            kafka=settings.kafka,
            notify=False,
        )
    was = f"v{event.previous_version}" if event.previous_version else "no champion"
    _report_move(
        settings,
        event,
        f"approved {event.model_name} v{event.version}: now champion (was {was}); "
        f"by {event.actor}: {reason}",
        as_json,
    )


@models_app.command()
def reject(
    version: str = typer.Argument(
        ..., callback=_version_arg, metavar="VERSION", help="Version number (3 or v3)."
    ),
    reason: str = typer.Option(
        ..., "--reason", "-r", callback=_reason_arg, help="Why: recorded on the version."
    ),
    by: str | None = typer.Option(
        None, "--by", callback=_by_arg, help="Who decides; default: your user name."
    ),
) -> None:
    """Reject a pending candidate; the champion stays. Recorded as tags review=rejected, ..."""
    from flywheel import review

    settings = settings_or_exit()
    with _registry_errors(settings):
        registry = _open(settings)
        tags = review.reject(_version(version), reason=reason, actor=by, registry=registry)
        champion = registry.champion_version()
    typer.echo(
        f"rejected {registry.name} v{version}; champion stays "
        f"{'v' + champion if champion else 'none'}; by {tags['review_by']}: {reason}"
    )
