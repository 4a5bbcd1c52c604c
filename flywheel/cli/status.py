"""`flywheel status`: is the loop up, and is it caught up? One look for an operator.

It asks each part the way the parts ask each other, with short timeouts, and never fails
because one part is down (that part's entry says why):
- each service replica (`--service URL`, repeatable): `/readyz` — ready, the version it
  serves, whether its prediction log reaches Kafka, records waiting in its spool;
- the registry: the champion every replica should serve;
- Kafka: the feedback group's committed offset and lag on every partition of the
  prediction and correction topics;
- the training store: schema revision against the code's, and each learner lineage's
  watermark with the trainable examples above it and who holds its lease (the one learner
  that may write it; a lease that ran out means no learner is running for it).

"Problems" are what needs a person (a replica down or serving another version, a spool
not draining, a store behind the code, a part unreachable, a lineage no learner holds):
exit 1. "Behind" is the loop
catching up (lag above `--max-lag`, a learner more than one update behind): reported,
exit 0.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from flywheel.cli import app, settings_or_exit
from flywheel.cli.tables import print_table
from flywheel.settings import Settings, mask_credentials


def _default_service(settings: Settings) -> str:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.port}"


def _service(url: str, timeout_s: float) -> dict[str, Any]:
    import httpx

    out: dict[str, Any] = {"url": url, "reachable": False, "ready": False}
    try:
        response = httpx.get(f"{url.rstrip('/')}/readyz", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return out | {"error": f"{type(exc).__name__}: {exc or 'no answer'}"}
    try:
        body = response.json()
    except ValueError:
        return out | {"reachable": True, "error": f"/readyz answered {response.status_code}"}
    if not isinstance(body, dict):
        return out | {"reachable": True, "error": "/readyz answered something else than JSON"}
    return out | {
        "reachable": True,
        "ready": bool(body.get("ready")),
        "model_version": body.get("model_version"),
        "kafka_connected": body.get("kafka_connected"),
        "spooled_records": body.get("spooled_records"),
    }


def _champion(settings: Settings) -> dict[str, Any]:
    from flywheel.registry import Registry

    name = settings.registry.model_name
    try:
        return {"model_name": name, "champion": Registry.of(settings).champion_version()}
    except Exception as exc:  # noqa: BLE001 - any failure of the registry is reported
        return {"model_name": name, "champion": None, "error": f"{type(exc).__name__}: {exc}"}


def _kafka(settings: Settings, timeout_s: float) -> dict[str, Any]:
    from flywheel.broker import BrokerError, consumer_lag
    from flywheel.kafka_security import kafka_python_options

    k = settings.kafka
    group = settings.feedback.feedback_group
    out: dict[str, Any] = {"bootstrap": k.kafka_bootstrap, "group": group, "partitions": []}
    if not k.kafka_bootstrap:
        return out | {"error": "FLYWHEEL_KAFKA_BOOTSTRAP is not set"}
    topics = [k.topic_predictions, k.topic_corrections, k.topic_scores]
    try:
        lags = consumer_lag(
            k.kafka_bootstrap, group, topics, timeout_s, security=kafka_python_options(k)
        )
    except BrokerError as exc:
        return out | {"error": str(exc)}
    fields = ("topic", "partition", "committed", "end", "lag")
    out["partitions"] = [{f: getattr(p, f) for f in fields} for p in lags]
    out["lag_total"] = sum(p.lag for p in lags)
    return out


def _store(settings: Settings) -> dict[str, Any]:
    from sqlalchemy.exc import SQLAlchemyError

    from flywheel.store import LeaseTable, head, learner_progress, make_engine, session_factory
    from flywheel.store import current as current_revision

    url = settings.resolved_database_url
    out: dict[str, Any] = {"url": mask_credentials(str(url)), "head": head(), "learners": []}
    try:
        out["revision"] = current_revision(url)
        out["current"] = out["revision"] == out["head"]
        if not out["current"]:
            return out
        engine = make_engine(url)
        try:
            with session_factory(engine)() as session:
                progress = learner_progress(session)
                leases = LeaseTable(engine, ttl_s=1.0)
                holders = {p.lineage: leases.holder(p.lineage, session) for p in progress}
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        return out | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    out["learners"] = [
        {
            "lineage": p.lineage,
            "watermark": p.watermark,
            "unread_at_most": p.unread_at_most,
            "updated_at": p.updated_at.isoformat() if p.updated_at else None,
            "lease": _lease(holders[p.lineage]),
        }
        for p in progress
    ]
    return out


def _lease(holder: Any) -> dict[str, Any] | None:
    if holder is None:
        return None
    return {
        "owner": holder.owner,
        "token": holder.token,
        "expires_in_s": round(holder.expires_in_s, 1),
        "held": holder.expires_in_s > 0,
    }


def gather(
    settings: Settings, services: list[str], timeout_s: float, max_lag: int
) -> dict[str, Any]:
    """The whole status document (`--json`), with its verdict: `problems` and `behind`."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx  # noqa: F401  (imported here, not by two threads at once)

    # the replicas' and the broker's answers (network waits, up to `timeout_s` each when a
    # part is down) in threads, while this one reads the registry and the store (MLflow's
    # and Alembic's imports: seconds of CPU on a busy machine)
    with ThreadPoolExecutor(max_workers=1 + len(services)) as pool:
        service_docs = [pool.submit(_service, url, timeout_s) for url in services]
        kafka_doc = pool.submit(_kafka, settings, timeout_s)
        registry, store_doc = _champion(settings), _store(settings)
        doc: dict[str, Any] = {
            "services": [f.result() for f in service_docs],
            "registry": registry,
            "kafka": kafka_doc.result(),
            "store": store_doc,
        }
    problems: list[str] = []
    behind: list[str] = []
    champion = doc["registry"]["champion"]
    if "error" in doc["registry"]:
        problems.append(f"registry: {doc['registry']['error']}")
    for svc in doc["services"]:
        url = svc["url"]
        if not svc["reachable"] or "error" in svc:
            problems.append(f"{url}: {svc.get('error', 'unreachable')}")
        elif not svc["ready"]:
            problems.append(f"{url}: not ready")
        if svc.get("model_version") and champion and svc["model_version"] != champion:
            problems.append(f"{url}: serves v{svc['model_version']}, the champion is v{champion}")
        if svc.get("spooled_records"):
            problems.append(f"{url}: {svc['spooled_records']} records in its spool")
    kafka = doc["kafka"]
    if "error" in kafka:
        problems.append(f"kafka: {kafka['error']}")
    elif kafka["lag_total"] > max_lag:
        behind.append(f"feedback group {kafka['group']}: {kafka['lag_total']} records to read")
    store = doc["store"]
    if "error" in store:
        problems.append(f"store: {store['error']}")
    elif not store["current"]:
        problems.append(
            f"store: schema {store['revision'] or 'empty'}, the code needs {store['head']} "
            "(flywheel db upgrade)"
        )
    batch = settings.learner.learn_batch
    for lr in store["learners"]:
        lease = lr["lease"]
        if lease is not None and not lease["held"]:
            problems.append(
                f"learner {lr['lineage']}: no learner holds it (the lease of {lease['owner']} "
                f"ran out {-lease['expires_in_s']:.0f} s ago)"
            )
        if lr["unread_at_most"] > batch:
            behind.append(f"learner {lr['lineage']}: up to {lr['unread_at_most']} examples unread")
    doc["problems"], doc["behind"] = problems, behind
    doc["caught_up"] = not problems and not behind
    return doc


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if doc["problems"]:
        console.print(f"[bold red]problems[/]: {len(doc['problems'])}")
        for p in doc["problems"]:
            console.print(f"  - {p}", highlight=False, markup=False)
    if doc["behind"]:
        console.print("[bold yellow]catching up[/]:")
        for b in doc["behind"]:
            console.print(f"  - {b}", highlight=False, markup=False)
    if doc["caught_up"]:
        console.print("[bold green]caught up[/]: every part answers and nothing is waiting")
    reg = doc["registry"]
    champion = f"v{reg['champion']}" if reg["champion"] else "none"
    console.print(f"champion: {reg['model_name']} {champion}", highlight=False)
    services = Table(title="service replicas")
    for col in ("url", "ready", "serves", "kafka", "spooled"):
        services.add_column(col)
    for s in doc["services"]:
        services.add_row(
            s["url"],
            "yes" if s["ready"] else ("no" if s["reachable"] else "unreachable"),
            f"v{s['model_version']}" if s.get("model_version") else "",
            {True: "connected", False: "not connected"}.get(s.get("kafka_connected"), ""),
            str(s.get("spooled_records", "")),
        )
    print_table(console, services)
    kafka = doc["kafka"]
    lag = Table(title=f"feedback group {kafka['group']} on {kafka['bootstrap'] or '(no Kafka)'}")
    for col in ("topic", "partition", "committed", "end", "lag"):
        lag.add_column(col, justify="left" if col == "topic" else "right")
    for p in kafka["partitions"]:
        committed = "none" if p["committed"] is None else str(p["committed"])
        lag.add_row(p["topic"], str(p["partition"]), committed, str(p["end"]), str(p["lag"]))
    print_table(console, lag)
    store = doc["store"]
    learners = Table(title=f"learners in {store['url']} (schema {store.get('revision')})")
    for col in ("lineage", "watermark", "unread (at most)", "saved (UTC)", "lease holder"):
        learners.add_column(col)
    for lr in store["learners"]:
        saved = (lr["updated_at"] or "")[:19].replace("T", " ")
        lease = lr["lease"]
        holder = (
            "none"
            if lease is None
            else f"{lease['owner']} (token {lease['token']}, "
            + (f"{lease['expires_in_s']:g} s left)" if lease["held"] else "ran out)")
        )
        learners.add_row(
            lr["lineage"], str(lr["watermark"]), str(lr["unread_at_most"]), saved, holder
        )
    print_table(console, learners)


@app.command()
def status(
    service: list[str] = typer.Option(
        [],
        "--service",
        help="A service replica's base URL; repeat for each. Default: this host's "
        "FLYWHEEL_HOST and FLYWHEEL_PORT.",
    ),
    max_lag: int = typer.Option(
        1000, "--max-lag", min=0, help="Feedback lag (records) still counted as caught up."
    ),
    timeout: float = typer.Option(
        3.0, "--timeout", min=0.1, max=60, help="Seconds to wait for each part."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object) and nothing else."),
) -> None:
    """Each part's health, consumer lag per partition, spool depth and served version per
    replica, each learner's cursor. Exits 1 when something needs a person."""
    settings = settings_or_exit()
    for url in service:
        if not url.startswith(("http://", "https://")):
            typer.echo(f"error: --service {url!r}: expected a URL like http://host:8000", err=True)
            raise typer.Exit(2)
    doc = gather(settings, service or [_default_service(settings)], timeout, max_lag)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
    else:
        _print(doc)
    if doc["problems"]:
        raise typer.Exit(1)
