"""A whole Flywheel deployment on loopback, for the fault suite and `bench faults` (issue 27).

One module shared by `tests/faults/` and `bench/faults.py` (a benchmark must not import
the tests, the tests may import a benchmark's harness): its own PostgreSQL
(`bench._pg_server.PgServer`, so it may be killed), the embedded broker (the real Tansu
binary as a process of its own, so it may be SIGSTOPped), two `flywheel serve` replicas
(each its own FLYWHEEL_HOME and spool, app keys on), two `flywheel feedback` workers and
two `flywheel learn` processes (one stands by on the lineage's lease). Every process is
the CLI, started in a process group of its own; `Cluster.close()` kills every group,
whatever happened before. `Load` is the client: predictions then their corrections at a
stated rate, a failed request retried on the other replica (a correction's id depends
only on the prediction, label and app, so a retry is the same correction). `Faults`
injects the issue's faults in sequence and measures, after each, the seconds until every
record acknowledged before its end is in the store (predictions stored, corrections
joined) and every spool is empty: the catch-up time. `verify()` counts what was lost or
duplicated and checks the learner's ledger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._pg_server import PgServer

__all__ = ["Cluster", "FAULTS", "Faults", "Load", "Proc", "run_scenario", "verify"]

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
APP = "faults"
SOURCES = 40  # sub-sources of the app: the privacy budget is per source, they recur
FAULTS = (
    "worker-kill",
    "postgres-kill",
    "broker-pause",
    "replica-kill",
    "replica-term",
    "learner-kill",
)
READY_TIMEOUT_S = 240.0  # a CLI process under load: imports of torch, MLflow, librdkafka
SKIP_S = 2.0  # a replica that failed is skipped this long (a load balancer's health check)
GIVE_UP_S = 120.0  # a request failing on every replica this long is given up (and counted)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Proc:
    """One CLI process the supervisor (the harness) may kill and restart."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready: Callable[[], bool]
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with self.log.open("a") as out:  # the child keeps its own descriptor
            out.write(f"--- start {self.starts + 1} ---\n")
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a kill reaches its children
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        os.killpg(self.popen.pid, sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        t0 = time.monotonic()
        while not self.ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited while starting:\n{self.tail()}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(
                    f"{self.name} not ready within {timeout_s:.0f} s:\n{self.tail()}"
                )
            time.sleep(0.2)
        return time.monotonic() - t0

    def stop(self) -> None:
        """SIGKILL to the group (the end of a run: nothing is checked after)."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
    import httpx

    try:
        r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout_s)
    except httpx.HTTPError:
        return 0, ""
    return r.status_code, r.text


def _ready(port: int) -> Callable[[], bool]:
    return lambda: _get(port, "/readyz")[0] == 200


def spooled(port: int) -> float | None:
    """The replica's spool depth (`flywheel_log_spooled_records`); None if it does not answer."""
    code, text = _get(port, "/metrics", 5.0)
    if code != 200:
        return None
    for line in text.splitlines():
        if line.startswith("flywheel_log_spooled_records "):
            return float(line.split()[1])
    return None


class Cluster:
    """The deployment; a context manager whose exit stops every process and server."""

    def __init__(
        self,
        work: Path,
        pg_bin: Path,
        *,
        learn_batch: int = 20,
        lease_s: float = 3.0,
        lease_renew_s: float = 1.0,
    ) -> None:
        self.work = work
        self.pg_bin = pg_bin
        self.learn_batch, self.lease_s, self.lease_renew_s = learn_batch, lease_s, lease_renew_s
        self.pg: PgServer | None = None
        self.broker: Any = None
        self.procs: dict[str, Proc] = {}
        self.key = ""
        self.group = f"faults-{uuid.uuid4().hex[:6]}"

    # --- set-up -------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        from flywheel.broker import EmbeddedBroker, ensure_topics
        from flywheel.learner import ensure_champion
        from flywheel.registry import Registry
        from flywheel.settings import Settings, prepare_home
        from flywheel.store import add_app, make_engine, session_factory
        from flywheel.store import upgrade as upgrade_store

        self.pg = PgServer(self.pg_bin)
        self.pg.start()
        self.broker = EmbeddedBroker(log_file=self.work / "broker.log")
        self.broker.start()
        self.settings = Settings(
            home=self.work / "home",
            database_url=self.pg.url,
            mlflow_tracking_uri=f"sqlite:///{self.work / 'mlflow.db'}",
            kafka_bootstrap=self.broker.bootstrap,
        )
        prepare_home(self.settings)
        s = self.settings
        ensure_topics(self.broker.bootstrap, s.topics, s.topic_partitions)
        upgrade_store(self.pg.url)
        # a new deployment: `init` of the synthetic problem (trusted set and champion)
        ensure_champion(s.trusted, Registry.of(s))
        engine = make_engine(self.pg.url)
        try:
            with session_factory(engine).begin() as session:
                self.key = add_app(session, APP, "predict,correct")
        finally:
            engine.dispose()
        self._define()

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        from flywheel.signing import default_key_paths

        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        return env | {
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_DATABASE_URL": self.pg_url,
            "FLYWHEEL_MLFLOW_TRACKING_URI": s.resolved_mlflow_uri,
            "FLYWHEEL_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            # the CI machine stalls: a slow acknowledgement must not become a resend
            "FLYWHEEL_KAFKA_TIMEOUT_S": "10",
            "FLYWHEEL_RETRY_MAX_S": "2",  # back within 2 s of a dependency
            "FLYWHEEL_FEEDBACK_GROUP": self.group,
            "FLYWHEEL_FEEDBACK_SESSION_TIMEOUT_MS": "6000",
            "FLYWHEEL_FEEDBACK_MAX_RECORDS": "200",
            "FLYWHEEL_PREDICTION_DURABILITY": "durable",  # the mode with no loss window
            "FLYWHEEL_SPOOL_RETRY_S": "0.5",
            "FLYWHEEL_LEARN_BATCH": str(self.learn_batch),
            "FLYWHEEL_LEARN_POLL_S": "0.5",
            "FLYWHEEL_LEARN_LEASE_S": str(self.lease_s),
            "FLYWHEEL_LEARN_LEASE_RENEW_S": str(self.lease_renew_s),
            "FLYWHEEL_GATE_MIN_HOLDOUT": "5",
            # a key is read from the store again after 2 s, not 30: a store outage always
            # meets key checks that need the store (they must answer 503, never 500)
            "FLYWHEEL_AUTH_CACHE_TTL_S": "2",
            # one promotion key pair for the deployment (the setup's home): the replicas,
            # each in a home of its own, trust what the learners sign
            "FLYWHEEL_TRUSTED_KEYS": str(default_key_paths(s.home_dir)[1]),
            **extra,
        }

    @property
    def pg_url(self) -> str:
        assert self.pg is not None
        return self.pg.url

    def _define(self) -> None:
        from flywheel.broker import free_port

        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        self.replica_ports: list[int] = []
        for i in range(2):
            port = free_port()
            self.replica_ports.append(port)
            home = self.work / f"replica-{i}"
            self.procs[f"replica-{i}"] = Proc(
                f"replica-{i}",
                [FLYWHEEL, "serve", "--port", str(port)],
                self.env(home),
                logs / f"replica-{i}.log",
                _ready(port),
            )
        for i in range(2):
            port = free_port()
            self.procs[f"worker-{i}"] = Proc(
                f"worker-{i}",
                [FLYWHEEL, "feedback"],
                self.env(self.settings.home_dir, FLYWHEEL_FEEDBACK_METRICS_PORT=str(port)),
                logs / f"worker-{i}.log",
                _ready(port),
            )
        for i in range(2):
            port = free_port()
            self.procs[f"learner-{i}"] = Proc(
                f"learner-{i}",
                [FLYWHEEL, "learn"],
                self.env(self.settings.home_dir, FLYWHEEL_LEARN_METRICS_PORT=str(port)),
                logs / f"learner-{i}.log",
                lambda: True,  # ready: a holder or a standby (`lease_holder`)
            )

    def start(self) -> float:
        """Every process at once; seconds until the replicas and workers are ready and a
        learner holds the lease."""
        t0 = time.monotonic()
        for p in self.procs.values():
            p.start()
        for p in self.procs.values():
            p.wait_ready()
        self.wait_for_holder()
        return time.monotonic() - t0

    @property
    def lineage(self) -> str:
        return f"{self.settings.model_name}:online"

    def lease_holder(self) -> str | None:
        """The learner process holding the lineage's live lease, by name."""
        from flywheel.store import LeaseTable, make_engine

        engine = make_engine(self.pg_url)
        try:
            holder = LeaseTable(engine, ttl_s=self.lease_s).holder(self.lineage)
        except Exception:  # the store is down: nobody known
            return None
        finally:
            engine.dispose()
        if holder is None or holder.expires_in_s < 0:
            return None
        pid = int(holder.owner.split(":")[1])  # host:pid:random
        for name, p in self.procs.items():
            if name.startswith("learner-") and p.popen is not None and p.pid == pid:
                return name
        return None

    def wait_for_holder(self, other_than: str | None = None, timeout_s: float = 120.0) -> str:
        t0 = time.monotonic()
        while True:
            holder = self.lease_holder()
            if holder is not None and holder != other_than:
                return holder
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"no learner took the lease within {timeout_s:.0f} s")
            time.sleep(0.2)

    def dead(self) -> list[str]:
        """Processes that exited without being told to (a supervisor would restart them)."""
        return [n for n, p in self.procs.items() if not p.alive()]

    def spools(self) -> list[float | None]:
        return [spooled(port) for port in self.replica_ports]

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        if self.broker is not None:
            if self.broker.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # a paused broker stops too
                    os.kill(self.broker.pid, signal.SIGCONT)
            self.broker.stop()
        if self.pg is not None:
            self.pg.close()


@dataclass
class Counts:
    """What the client saw, per phase: requests that failed and were retried."""

    failed: dict[str, int] = field(default_factory=dict)
    predictions: list[tuple[float, str]] = field(default_factory=list)  # (time, id)
    corrections: list[tuple[float, str]] = field(default_factory=list)
    given_up: int = 0
    errors_5xx: dict[int, int] = field(default_factory=dict)  # status -> answers


@dataclass
class _Conn:
    """One client connection: its HTTP client, the replica it goes to next, and when each
    replica that failed may be tried again."""

    http: Any
    turn: int = 0
    down_until: dict[int, float] = field(default_factory=dict)


class Load(threading.Thread):
    """Predictions, then a correction for each, at `rate` predictions/s over `clients`
    connections; a request that fails (refused, reset, 5xx) is retried on the other
    replica until it is answered, as a client behind a load balancer would."""

    def __init__(self, cluster: Cluster, rate: float, *, clients: int = 2, rows: int = 2) -> None:
        super().__init__(daemon=True)
        self.cluster, self.rate, self.clients, self.rows = cluster, rate, clients, rows
        self.counts = Counts()
        self.phase = "steady"
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True)
            for k in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stop(self) -> None:
        self.halt.set()
        self.join(GIVE_UP_S + 60)

    def _failed(self) -> None:
        with self.lock:
            self.counts.failed[self.phase] = self.counts.failed.get(self.phase, 0) + 1

    def _post(self, conn: _Conn, path: str, body: dict[str, Any], ok: int) -> Any:
        """`body` to the replicas in turn, skipping one that failed in the last `SKIP_S`
        (a load balancer's health check); the answer's JSON, or None after `GIVE_UP_S`
        of failures (counted)."""
        ports = self.cluster.replica_ports
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            now = time.monotonic()
            order = [ports[(conn.turn + i) % len(ports)] for i in range(len(ports))]
            up = [p for p in order if conn.down_until.get(p, 0.0) <= now]
            port = (up or order)[0]
            conn.turn = (ports.index(port) + 1) % len(ports)
            try:
                r = conn.http.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=30)
                if r.status_code == ok:
                    return r.json()
                if r.status_code >= 500:
                    with self.lock:
                        got = self.counts.errors_5xx
                        got[r.status_code] = got.get(r.status_code, 0) + 1
                if r.status_code < 500 and r.status_code != 429:
                    raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
            except RuntimeError:
                raise
            except Exception:  # refused, reset, timed out: the replica is down
                pass
            conn.down_until[port] = time.monotonic() + SKIP_S
            self._failed()
            if time.monotonic() > deadline:
                with self.lock:
                    self.counts.given_up += 1
                return None
            if len(up) < 2:
                time.sleep(0.2)  # no replica known to be up: wait a moment

    def _client(self, k: int) -> None:
        import httpx

        from flywheel.events import correction_id
        from flywheel.streams import drift_concept

        s = self.cluster.settings
        concept = drift_concept(s.trusted.seed)  # a changed world: the learner has work
        headers = {"Authorization": f"Bearer {self.cluster.key}"}
        interval = self.clients * self.rows / self.rate
        n = 0
        next_at = time.monotonic()
        with httpx.Client(headers=headers) as http:
            conn = _Conn(http, turn=k)
            while not self.halt.is_set():
                x, truth = concept.sample(self.rows, sample_seed=k * 1_000_003 + n)
                n += 1
                try:
                    answer = self._post(conn, "/v1/predict", {"instances": x.tolist()}, 200)
                    if answer is None:
                        continue
                    ids = [p["id"] for p in answer["predictions"]]
                    with self.lock:
                        now = time.monotonic()
                        self.counts.predictions.extend((now, i) for i in ids)
                    body = {
                        "corrections": [
                            {"prediction_id": i, "label": t, "source": f"u{(n + j) % SOURCES}"}
                            for j, (i, t) in enumerate(zip(ids, truth, strict=True))
                        ]
                    }
                    if self._post(conn, "/v1/corrections", body, 202) is None:
                        continue
                    with self.lock:
                        now = time.monotonic()
                        self.counts.corrections.extend(
                            (now, correction_id(i, t, APP)) for i, t in zip(ids, truth, strict=True)
                        )
                except Exception as exc:  # a refusal no retry fixes: reported, the load stops
                    self.errors.append(repr(exc))
                    return
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    self.halt.wait(pause)
                else:
                    next_at = time.monotonic()  # behind: no burst to catch up

    def acked_until(self, t: float) -> tuple[set[str], set[str]]:
        with self.lock:
            return (
                {i for at, i in self.counts.predictions if at <= t},
                {i for at, i in self.counts.corrections if at <= t},
            )


def stored(url: str) -> tuple[list[str], dict[str, str]]:
    """Every prediction id in the store, and every correction id with its status."""
    from sqlalchemy import select

    from flywheel.store import Correction, Prediction, make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            predictions = list(conn.scalars(select(Prediction.id)))
            corrections = {
                r[0]: r[1] for r in conn.execute(select(Correction.id, Correction.status))
            }
    finally:
        engine.dispose()
    return predictions, corrections


def caught_up(cluster: Cluster, predictions: set[str], corrections: set[str]) -> bool:
    """Every given prediction stored, every given correction joined, every spool empty."""
    if any(depth != 0 for depth in cluster.spools()):
        return False
    try:
        have, status = stored(cluster.pg_url)
    except Exception:  # the store is not back yet
        return False
    return predictions <= set(have) and all(status.get(c) == "joined" for c in corrections)


def total_lag(cluster: Cluster) -> int | None:
    from flywheel.broker import consumer_lag

    s = cluster.settings
    try:
        lags = consumer_lag(
            cluster.broker.bootstrap, cluster.group, [s.topic_predictions, s.topic_corrections]
        )
    except Exception:
        return None
    return sum(lag.lag for lag in lags)


class Faults:
    """The issue's faults in sequence, each followed by its catch-up measurement."""

    def __init__(
        self, cluster: Cluster, load: Load, *, pg_down_s: float = 5.0, pause_s: float = 10.0
    ) -> None:
        self.cluster, self.load = cluster, load
        self.pg_down_s, self.pause_s = pg_down_s, pause_s
        self.results: list[dict[str, Any]] = []

    def _restart(self, name: str, sig: int) -> None:
        """`sig` to the process, then start it again once it has exited, as a supervisor
        would (compose's `restart: unless-stopped`), and wait until it is ready."""
        p = self.cluster.procs[name]
        p.signal(sig)
        code = p.wait(120)
        if sig == signal.SIGTERM and code != 0:
            raise RuntimeError(f"{name} exited {code} on SIGTERM:\n{p.tail()}")
        p.start()
        p.wait_ready()

    def inject(self, fault: str) -> dict[str, Any]:
        """One fault; returns how long the faulted part was out (`down_s`: until the
        database accepts again, the broker runs again, the restarted process is ready or
        the standby holds the lease), the seconds from then until every record
        acknowledged by then is stored and every spool is empty (`catch_up_s`), and the
        requests that failed meanwhile (each retried on the other replica)."""
        c = self.cluster
        self.load.phase = fault
        t0 = time.monotonic()
        extra: dict[str, Any] = {}
        if fault == "worker-kill":
            self._restart("worker-0", signal.SIGKILL)
        elif fault == "postgres-kill":
            assert c.pg is not None
            c.pg.kill()
            time.sleep(self.pg_down_s)
            c.pg.start()
        elif fault == "broker-pause":
            pid = c.broker.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(self.pause_s)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif fault == "replica-kill":
            self._restart("replica-0", signal.SIGKILL)
        elif fault == "replica-term":
            stopping = time.monotonic()
            self._restart("replica-1", signal.SIGTERM)
            extra = {"restart_s": time.monotonic() - stopping}
        elif fault == "learner-kill":
            holder = c.wait_for_holder()
            c.procs[holder].signal(signal.SIGKILL)
            c.procs[holder].wait(60)
            standby = c.wait_for_holder(other_than=holder)
            extra = {"killed": holder, "took_over": standby, "takeover_s": time.monotonic() - t0}
            c.procs[holder].start()  # back, as the standby now
        else:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        back = time.monotonic()
        want = self.load.acked_until(back)
        deadline = back + 180
        while not caught_up(c, *want):
            dead = c.dead()
            if dead:
                raise RuntimeError(
                    f"{dead} exited by themselves after {fault}:\n"
                    + "\n".join(c.procs[n].tail() for n in dead)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"not caught up within 180 s of {fault}'s end")
            time.sleep(0.25)
        catch_up = time.monotonic() - back
        self.load.phase = "steady"
        result = {
            "fault": fault,
            "down_s": back - t0,
            "catch_up_s": catch_up,
            "failed_requests": self.load.counts.failed.get(fault, 0),
            "lag_after": total_lag(c),
            **extra,
        }
        _say(
            f"{fault}: out {result['down_s']:.1f} s, caught up {catch_up:.1f} s after, "
            f"{result['failed_requests']} requests failed (retried on the other replica)"
            + (
                f", standby took over in {extra['takeover_s']:.1f} s"
                if "takeover_s" in extra
                else ""
            )
        )
        self.results.append(result)
        return result


def verify(cluster: Cluster, load: Load) -> dict[str, Any]:
    """Exact counts after the run: lost and duplicated records, the learner's ledger."""
    from sqlalchemy import func, select

    from flywheel.broker import read_topic
    from flywheel.privacy import PrivacyLedger, epsilon
    from flywheel.registry import Registry
    from flywheel.store import Example, make_engine

    returned = [i for _, i in load.counts.predictions]
    acked = [i for _, i in load.counts.corrections]
    have, status = stored(cluster.pg_url)
    have_set = set(have)
    s = cluster.settings
    registry = Registry.of(s)
    versions = sorted(
        (v for v in registry.versions(with_runs=True) if v.tags.get("source") == "online"),
        key=lambda v: int(v.version),
    )
    engine = make_engine(cluster.pg_url)
    try:
        ledger = PrivacyLedger(engine)
        entries = {e.id: e for e in ledger.entries(cluster.lineage)}
        mislabelled = [
            v.version
            for v in versions
            if (row := entries.get(int(v.tags["learner_ledger_row"]))) is None
            or row.version != v.version
            or row.update_no != int(v.tags["learner_update"])
        ]
        online = {v.version for v in versions}
        promoted = [v for v in registry.champion_history() if v in online]
        unledgered = [v for v in promoted if ledger.entry_for_version(v) is None]
        ranges = sorted(
            (int(v.params["first_example_id"]), int(v.params["last_example_id"])) for v in versions
        )
        overlaps = [(a, b) for a, b in zip(ranges, ranges[1:], strict=False) if a[1] >= b[0]]
        with engine.connect() as conn:  # one training example per correction, at most
            per_correction = conn.execute(
                select(func.count())
                .select_from(Example)
                .where(Example.dedup_key.startswith("correction:"))
                .group_by(Example.dedup_key)
                .having(func.count() > 1)
            ).all()
        sources = [sp.source for sp in ledger.sources(cluster.lineage)]
        histories = ledger.histories(cluster.lineage, sources) if sources else {}
        worst = max(
            (epsilon(h, s.privacy_delta, s.privacy_accountant) for h in histories.values()),
            default=0.0,
        )
    finally:
        engine.dispose()
    # sent twice to Kafka (a resend after a late acknowledgement, a spool replay): the
    # store keeps one by id; reported, not a loss. Both topics are keyed by the
    # prediction id, and each prediction is corrected once.
    resent = {}
    for topic in (s.topic_predictions, s.topic_corrections):
        keys = [r.key for r in read_topic(cluster.broker.bootstrap, topic)]
        resent[topic] = len(keys) - len(set(keys))
    return {
        "predictions_returned": len(returned),
        "predictions_lost": len(set(returned) - have_set),
        "predictions_returned_twice": len(returned) - len(set(returned)),
        "corrections_acknowledged": len(acked),
        "corrections_lost": sum(1 for c in set(acked) if c not in status),
        "corrections_not_joined": sum(1 for c in set(acked) if status.get(c) != "joined"),
        "examples_duplicated": len(per_correction),
        "predictions_resent_on_topic": resent[s.topic_predictions],
        "corrections_resent_on_topic": resent[s.topic_corrections],
        "requests_given_up": load.counts.given_up,
        "answers_5xx": dict(load.counts.errors_5xx),
        "online_versions": len(versions),
        "versions_without_their_ledger_row": mislabelled,
        "promoted_online": len(promoted),
        "promoted_without_ledger_entry": unledgered,
        "example_ranges_overlapping": overlaps,
        "ledger_rows": len(entries),
        "worst_source_epsilon": worst,
        "epsilon_budget": s.privacy_epsilon,
        "spools": cluster.spools(),
        "exited_by_themselves": cluster.dead(),
        "starts": {n: p.starts for n, p in cluster.procs.items()},
    }


def run_scenario(
    work: Path,
    pg_bin: Path,
    *,
    rate: float,
    faults: tuple[str, ...] = FAULTS,
    steady_s: float = 5.0,
    say: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Start the deployment, drive `rate` predictions/s (each corrected), inject `faults`
    in turn (each caught up before the next), stop the load, wait for the last records
    and count. Every process is stopped on the way out, whatever happened."""
    with Cluster(work, pg_bin) as cluster:
        t0 = time.monotonic()
        started_s = cluster.start()
        say(f"deployment ready in {started_s:.1f} s (learner lease: {cluster.lease_holder()})")
        load = Load(cluster, rate)
        load.start()
        try:
            time.sleep(steady_s)
            injector = Faults(cluster, load)
            for fault in faults:
                injector.inject(fault)
                if load.errors:
                    raise RuntimeError(f"the client stopped: {load.errors}")
                time.sleep(steady_s)
        finally:
            load.stop()
        if load.errors:
            raise RuntimeError(f"the client stopped: {load.errors}")
        ended = time.monotonic()
        want = load.acked_until(ended)
        deadline = ended + 180
        while not caught_up(cluster, *want):
            if time.monotonic() > deadline:
                break  # verify() counts what is missing
            time.sleep(0.25)
        drain_s = time.monotonic() - ended
        time.sleep(1.0)  # a replayed batch, were one stored twice, would surface now
        counts = verify(cluster, load)
        wall_s = time.monotonic() - t0
        say(
            f"{counts['predictions_returned']} predictions, "
            f"{counts['corrections_acknowledged']} corrections acknowledged; lost "
            f"{counts['predictions_lost']} / {counts['corrections_lost']}; "
            f"{counts['online_versions']} online versions, {counts['promoted_online']} promoted; "
            f"worst source ε {counts['worst_source_epsilon']:.3f} of {counts['epsilon_budget']}; "
            f"{wall_s:.0f} s in all"
        )
        return {
            "rate": rate,
            "started_s": started_s,
            "faults": injector.results,
            "final_drain_s": drain_s,
            "failed_requests": sum(load.counts.failed.values()),
            "wall_s": wall_s,
            **counts,
        }
