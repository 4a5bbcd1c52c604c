"""`python -m bench hotswap`: throughput and p99 of POST /v1/predict while the model changes.

The real `flywheel serve` (registry champion, registry follower, Kafka prediction log)
runs as its own process on an embedded broker and a throwaway home (SQLite MLflow). One
load process drives it for the whole run and keeps every response's completion time,
latency and model version. The run alternates windows: steady (no promotion), then swap
(a promotion through `flywheel.promotion.promote` every `--interval` seconds, cycling
through three registered versions, so every promotion is a real load + warm), then a
short unmeasured settle gap. Figures per window kind are pooled over the rounds; the
targets are zero failed requests and p99(swap) <= 2 x p99(steady).

Checked, not assumed: every response names a registered version, every promoted version
is served (and how long after its promotion), the server counted one swap per promotion
and no failure, and the prediction events on Kafka name the same versions, as many per
version as responses did.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from bench.harness import document, load_range
from bench.serve import (
    REPO,
    BenchError,
    _child_env,
    _get,
    _tail,
    machine_info,
    split_cpus,
    stop_server,
    wait_ready,
    write_bodies,
)

P99_TARGET = 2.0  # p99 in swap windows / p99 in steady windows
SETTLE_S = 1.0  # unmeasured gap after a swap window: its last swap must not leak into steady
SWAP_LOG = re.compile(r"swapped \S+ v(\S+) -> v(\S+) \(load \+ warm (\d+) ms\)")


@dataclass
class Window:
    kind: str  # steady | swap
    round: int
    start: float  # time.monotonic(), shared with the load process
    end: float


@dataclass
class Promotion:
    version: str
    called: float
    returned: float
    window: int  # index into the windows


# -- processes ---------------------------------------------------------------------------
def start_server(
    port: int, home: Path, bootstrap: str, log_path: Path, cpus: set[int] | None
) -> subprocess.Popen[bytes]:
    """`flywheel serve` as production runs it; its own session, so stopping reaches all."""
    env = _child_env() | {"FLYWHEEL_HOME": str(home), "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flywheel", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )


def start_load(
    port: int, duration: float, concurrency: int, bodies: Path, out: Path
) -> tuple[subprocess.Popen[str], float]:
    """The load process and the monotonic time its connections started."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench._hotswap_load",
            "--port",
            str(port),
            "--duration",
            str(duration),
            "--concurrency",
            str(concurrency),
            "--bodies",
            str(bodies),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("started "):
        proc.kill()
        raise BenchError(
            f"load process did not start: {line!r} "
            f"{proc.stderr.read()[-2000:] if proc.stderr else ''}"
        )
    return proc, float(line.split()[1])


def metric_values(port: int, names: tuple[str, ...]) -> dict[str, float]:
    _, body = _get(port, "/metrics", 5.0)
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[name] = float(value)
    return out


def events_per_version(bootstrap: str, topic: str, at_least: int) -> dict[str, int]:
    """How many prediction events name each version (read from the beginning to the end)."""
    import orjson

    from flywheel.broker import BrokerError, read_topic

    try:
        records = read_topic(bootstrap, topic, at_least=at_least, timeout_s=120)
    except BrokerError as exc:
        raise BenchError(str(exc)) from exc
    counts: dict[str, int] = {}
    seen: set[bytes] = set()
    for r in records:
        if r.key in seen:  # at-least-once: a duplicate is one prediction
            continue
        seen.add(r.key)
        v = orjson.loads(r.value)["model_version"]
        counts[v] = counts.get(v, 0) + 1
    return counts


# -- setup -------------------------------------------------------------------------------
def prepare_registry(settings: Any, say) -> list[str]:
    """The trained seed champion plus two perturbed copies; returns [champion, v2, v3]."""
    import torch

    from flywheel.learner import ensure_champion
    from flywheel.registry import Registry

    registry = Registry.of(settings)
    champion = ensure_champion(settings.trusted, registry)
    versions = [champion]
    for seed in (1, 2):
        loaded = registry.load(champion)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in loaded.module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        versions.append(
            registry.publish(
                loaded.spec,
                loaded.module,
                tags={
                    "parent_version": champion,
                    "source": "manual",
                    "examples": "seed[0,800)",
                    "epsilon": "none",
                    "delta": "none",
                    "gate": "bench hotswap: perturbed copy",
                },
            )
        )
    say(f"registry: champion v{champion}, candidates v{versions[1]}, v{versions[2]}")
    return versions


# -- analysis ----------------------------------------------------------------------------
def window_figures(t: Any, lat: Any, windows: list[Window]) -> dict[str, Any]:
    """Throughput and latency of the 200 responses completed inside `windows`."""
    import numpy as np

    mask = np.zeros(len(t), dtype=bool)
    for w in windows:
        mask |= (t >= w.start) & (t < w.end)
    sel = np.sort(lat[mask]) * 1000
    seconds = sum(w.end - w.start for w in windows)

    def pct(q: float) -> float:  # nearest rank, as bench.loadgen
        if not len(sel):
            return 0.0
        return float(sel[max(1, min(len(sel), round(q / 100 * len(sel) + 0.5))) - 1])

    return {
        "count": int(mask.sum()),
        "seconds": seconds,
        "rps": float(mask.sum() / seconds) if seconds else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": float(sel[-1]) if len(sel) else 0.0,
    }


def errors_in(items: list[list[Any]], windows: list[Window]) -> int:
    return sum(1 for t, _ in items if any(w.start <= t < w.end for w in windows))


def analyse(
    trace: dict[str, Any], windows: list[Window], promotions: list[Promotion], registered: list[str]
) -> dict[str, Any]:
    import numpy as np

    t, lat, v = (np.asarray(trace[k], dtype=float) for k in ("t", "lat", "v"))
    versions = trace["versions"]
    per_window = []
    for i, w in enumerate(windows):
        fig = window_figures(t, lat, [w])
        fig.update(
            kind=w.kind,
            round=w.round,
            errors=errors_in(trace["errors"], [w]) + errors_in(trace["non_200"], [w]),
            promotions=sum(1 for p in promotions if p.window == i),
        )
        per_window.append(fig)
    pooled = {}
    for kind in ("steady", "swap"):
        ws = [w for w in windows if w.kind == kind]
        fig = window_figures(t, lat, ws)
        fig["errors"] = errors_in(trace["errors"], ws) + errors_in(trace["non_200"], ws)
        pooled[kind] = fig
    # from the announcement (promote() returned) to the first response on that version,
    # before the same version is promoted again
    follow_s: list[float | None] = []
    for i, p in enumerate(promotions):
        again = [q.called for q in promotions[i + 1 :] if q.version == p.version]
        idx = versions.index(p.version) if p.version in versions else -1
        hits = t[(v == idx) & (t > p.called) & (t < (again[0] if again else np.inf))]
        follow_s.append(float(hits.min() - p.returned) if len(hits) else None)
    served = {
        versions[int(i)]: int(n) for i, n in zip(*np.unique(v, return_counts=True), strict=True)
    }
    steady, swap = pooled["steady"], pooled["swap"]
    followed = [f for f in follow_s if f is not None]
    return {
        "windows": per_window,
        "pooled": pooled,
        "throughput_ratio": swap["rps"] / steady["rps"] if steady["rps"] else 0.0,
        "p99_ratio": swap["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] else float("inf"),
        "errors_total": len(trace["errors"]),
        "non_200_total": len(trace["non_200"]),
        "first_error": (trace["errors"] or trace["non_200"] or [[None, None]])[0][1],
        "responses_per_version": served,
        "unregistered_versions": sorted(set(served) - set(registered)),
        "follow_s": follow_s,
        "follow_s_median": float(np.median(followed)) if followed else None,
        "follow_s_max": max(followed) if followed else None,
        "promote_s_median": float(np.median([p.returned - p.called for p in promotions]))
        if promotions
        else None,
    }


def summarize(
    result: dict[str, Any],
    promotions: list[Promotion],
    server: dict[str, Any],
    events: dict[str, int],
) -> dict[str, Any]:
    errors = result["errors_total"] + result["non_200_total"]
    p99 = result["p99_ratio"]
    checks = {
        "zero failed requests": {"value": errors, "expected": 0, "ok": errors == 0},
        "every response names a registered version": {
            "value": result["unregistered_versions"] or "yes",
            "expected": "yes",
            "ok": not result["unregistered_versions"],
        },
        "every promotion served": {
            "value": sum(f is not None for f in result["follow_s"]),
            "expected": len(promotions),
            "ok": None not in result["follow_s"],
        },
        "server swaps = promotions": {
            "value": server["swaps"],
            "expected": len(promotions),
            "ok": server["swaps"] == len(promotions),
        },
        "server swap failures": {
            "value": server["swap_failures"],
            "expected": 0,
            "ok": server["swap_failures"] == 0,
        },
        "events per version = responses": {
            "value": events,
            "expected": result["responses_per_version"],
            "ok": events == result["responses_per_version"],
        },
    }
    return {
        "throughput_ratio": result["throughput_ratio"],
        "p99_ratio": p99,
        "targets": {
            "errors": {"target": "== 0", "value": errors, "pass": errors == 0},
            "p99_ratio": {"target": f"<= {P99_TARGET}", "value": p99, "pass": p99 <= P99_TARGET},
        },
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }


# -- the benchmark -----------------------------------------------------------------------
def schedule(t0: float, warmup: float, window: float, rounds: int) -> list[Window]:
    out, at = [], t0 + warmup
    for r in range(1, rounds + 1):
        out.append(Window("steady", r, at, at + window))
        out.append(Window("swap", r, at + window, at + 2 * window))
        at += 2 * window + SETTLE_S
    return out


def sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def drive(
    settings: Any, versions: list[str], windows: list[Window], interval: float, say
) -> list[Promotion]:
    """Promote the next version every `interval` seconds inside each swap window."""
    from flywheel import promotion
    from flywheel.registry import Registry

    registry = Registry.of(settings)
    cycle = versions[1:] + versions[:1]  # the champion is versions[0]: start elsewhere
    done: list[Promotion] = []
    for i, w in enumerate(windows):
        sleep_until(w.start)
        if w.kind != "swap":
            say(f"round {w.round}: steady window ({w.end - w.start:g}s)")
            continue
        n = max(1, int((w.end - w.start) / interval))
        say(f"round {w.round}: swap window, {n} promotions {interval:g}s apart")
        for k in range(n):
            sleep_until(w.start + k * interval)
            version = cycle[len(done) % len(cycle)]
            called = time.monotonic()
            promotion.promote(
                settings.kafka, version, reason="bench hotswap", actor="bench", registry=registry
            )
            done.append(Promotion(version, called, time.monotonic(), i))
    sleep_until(windows[-1].end)
    return done


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """A SIGTERM must still run the finally blocks that stop the server and the broker."""
    raise SystemExit(128 + signum)


def main(
    window: float = typer.Option(
        4.0, min=0.5, max=600.0, help="Seconds per steady window and per swap window."
    ),
    rounds: int = typer.Option(
        5,
        min=1,
        max=50,
        help="Steady + swap window pairs; many short pairs cancel drift on a busy host.",
    ),
    interval: float = typer.Option(
        0.75, min=0.1, max=60.0, help="Seconds between promotions in a swap window."
    ),
    warmup: float = typer.Option(2.0, min=0.0, max=60.0, help="Unmeasured seconds first."),
    concurrency: int = typer.Option(16, min=1, max=512, help="Keep-alive connections."),
    pin: bool = typer.Option(
        True, help="Server on its own core; broker, load and promotions on the rest."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Throughput and p99 of POST /v1/predict in windows with hot swaps vs steady ones."""
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    say = err.print if not json_out else (lambda msg: print(msg, file=sys.stderr))
    try:
        with ExitStack() as stack:
            doc = _run(stack, window, rounds, interval, warmup, concurrency, pin, say)
    except BenchError as exc:
        say(f"benchmark failed: {exc}")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
    if not doc["summary"]["ok"]:
        raise typer.Exit(1)


def _run(
    stack: ExitStack,
    window: float,
    rounds: int,
    interval: float,
    warmup: float,
    concurrency: int,
    pin: bool,
    say,
) -> dict[str, Any]:
    from flywheel.broker import EmbeddedBroker, ensure_topics, free_port
    from flywheel.settings import Settings, prepare_home

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fw-bench-")))
    machine = machine_info()
    split = split_cpus() if pin else None
    if split:  # the broker, the load process and the promotions inherit these
        os.sched_setaffinity(0, split[1])
        say(
            f"server pinned to CPU {sorted(split[0])}, broker + load + promotions to "
            f"{sorted(split[1])}"
        )
    broker = EmbeddedBroker(log_file=work / "broker.log")
    stack.callback(broker.stop)
    broker.start()
    settings = Settings(home=work / "home", kafka_bootstrap=broker.bootstrap, seed_examples=1000)
    prepare_home(settings)
    ensure_topics(broker.bootstrap, settings.topics, settings.topic_partitions)
    say(f"embedded broker at {broker.bootstrap}; training the seed champion ...")
    if split:  # setup is not measured: let it use every core
        os.sched_setaffinity(0, split[0] | split[1])
    versions = prepare_registry(settings, say)
    if split:
        os.sched_setaffinity(0, split[1])
    write_bodies(work / "bodies.jsonl")

    port = free_port()
    log_path = work / "server.log"
    server = start_server(
        port, settings.home_dir, broker.bootstrap, log_path, split[0] if split else None
    )
    stack.callback(stop_server, server)
    say(f"flywheel serve ready in {wait_ready(server, port, log_path):.1f}s")
    duration = warmup + rounds * (2 * window + SETTLE_S)
    load, t0 = start_load(port, duration, concurrency, work / "bodies.jsonl", work / "load.json")
    stack.callback(lambda: load.poll() is None and load.kill())
    windows = schedule(t0, warmup, window, rounds)
    cpu0 = time.process_time()
    promotions = drive(settings, versions, windows, interval, say)
    driver_cpu_s = time.process_time() - cpu0
    try:
        _, stderr = load.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError("the load process did not finish") from None
    if load.returncode != 0:
        raise BenchError(f"load process failed ({load.returncode}): {stderr[-3000:]}")
    trace = json.loads((work / "load.json").read_text())
    names = ("flywheel_model_swaps_total", "flywheel_model_swap_failures_total")
    m = metric_values(port, names)
    stop_server(server)  # its event log flushes before the topic is read
    swap_ms = [int(g[2]) for g in SWAP_LOG.findall(log_path.read_text(errors="replace"))]
    server_info = {
        "swaps": int(m.get(names[0], -1)),
        "swap_failures": int(m.get(names[1], -1)),
        "load_warm_ms": swap_ms,
        "log_tail": _tail(log_path, 5),
    }
    result = analyse(trace, windows, promotions, versions)
    events = events_per_version(broker.bootstrap, settings.topic_predictions, len(trace["t"]))
    from importlib import metadata

    machine["mlflow"] = metadata.version("mlflow")
    return document(
        "hotswap",
        machine,
        {
            "config": {
                "window_s": window,
                "rounds": rounds,
                "interval_s": interval,
                "warmup_s": warmup,
                "settle_s": SETTLE_S,
                "concurrency": concurrency,
                "order": "steady, swap, settle" + ", steady, swap, settle" * (rounds - 1),
                "request": "POST /v1/predict, 1 instance of 8 float features, keep-alive HTTP/1.1",
                "server": "flywheel serve (one uvicorn worker): registry champion, registry "
                "follower, confluent-kafka prediction log; MLflow on SQLite",
                "promotion": "flywheel.promotion.promote (alias move + model event), cycling "
                f"versions {versions[1:] + versions[:1]}",
                "pinning": (
                    f"server on CPU {sorted(split[0])}, broker + load + promotions on "
                    f"{sorted(split[1])}"
                )
                if split
                else "none",
                "registered_versions": versions,
            },
            "promotions": [asdict(p) for p in promotions],
            "driver_cpu_s": driver_cpu_s,
            "server": server_info,
            "events_per_version": events,
            "result": result,
            "summary": summarize(result, promotions, server_info, events),
        },
    )


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 120
    m, cfg, r, s = doc["machine"], doc["config"], doc["result"], doc["summary"]
    table = Table(
        title=f"POST /v1/predict, steady vs hot-swap windows ({cfg['window_s']:g}s "
        f"each, {cfg['rounds']} rounds, a promotion every "
        f"{cfg['interval_s']:g}s, concurrency {cfg['concurrency']})"
    )
    for col in ("window", "round", "promotions", "req/s", "p50 ms", "p99 ms", "max ms", "errors"):
        table.add_column(col, justify="left" if col == "window" else "right")
    for w in r["windows"]:
        table.add_row(
            w["kind"],
            str(w["round"]),
            str(w["promotions"]),
            f"{w['rps']:.0f}",
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            f"{w['max_ms']:.1f}",
            str(w["errors"]),
        )
    table.add_section()
    for kind in ("steady", "swap"):
        w = r["pooled"][kind]
        table.add_row(
            f"[bold]{kind} (pooled)[/]",
            "",
            "",
            f"{w['rps']:.0f}",
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            f"{w['max_ms']:.1f}",
            str(w["errors"]),
        )
    console.print(table)
    console.print(f"throughput ratio  {s['throughput_ratio']:.3f}  (swap / steady)")
    for name, t in s["targets"].items():
        verdict = "[green]PASS[/]" if t["pass"] else "[red]MISS[/]"
        console.print(f"{name:<17} {t['value']:.3f}  (target {t['target']})  {verdict}")
    ms = doc["server"]["load_warm_ms"]
    if ms:
        console.print(
            f"load + warm per swap: median {sorted(ms)[len(ms) // 2]} ms, max "
            f"{max(ms)} ms; promote() (alias + event) median "
            f"{r['promote_s_median'] * 1000:.0f} ms, then first response on the "
            f"new version after median {r['follow_s_median'] * 1000:.0f} ms, max "
            f"{r['follow_s_max'] * 1000:.0f} ms"
        )
    for name, c in s["checks"].items():
        mark = "[green]ok[/]" if c["ok"] else "[red]WRONG[/]"
        console.print(f"  {name:<42} {c['value']} (expected {c['expected']})  {mark}")
    console.print(
        f"[dim]{m['cpu_count']} CPUs ({m['cpu_model']}), GPU {m['gpu']}, Python "
        f"{m['python']}, torch {m['torch']}, MLflow {m['mlflow']}, "
        f"{m['uvicorn_loop']}/{m['uvicorn_http']}, {cfg['pinning']}, load average "
        f"{load_range(m)}, {doc['date']}[/]"
    )
