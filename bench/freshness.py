"""`python -m bench freshness`: seconds from a correction to serving a model trained on it.

The whole loop runs in one process on embedded defaults (embedded broker, SQLite store,
SQLite MLflow): the demo's simulated app streams requests across an abrupt concept change
and corrects a share of them after a delay; the feedback worker, the learner (N=100,
auto-promotion on) and the service run as in `flywheel demo`. For every correction that
became a training example, freshness is the time from the app sending it to the app
first being served a version whose training range covers that example.

Side by side, the same stream twice:
* ours: the service follows `flywheel.model-events` (and polls the registry as fallback);
* baseline: polling only, every 10 s (how TorchServe/Triton-style model repositories
  are usually watched): the service listens on a topic nobody announces on.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import typer

TARGET_MEDIAN_S = 10.0
BASELINE_POLL_S = 10.0


def run_loop(home: Path, requests: int, rate: float, follow_events: bool) -> dict[str, Any]:
    """One closed loop; returns freshness figures and how many versions were promoted."""
    from flywheel.demo import (
        DemoConfig,
        embedded_stack,
        learned_examples,
        running_loop,
        simulate_app,
    )
    from flywheel.demo.report import freshness
    from flywheel.settings import Settings, prepare_home

    settings = Settings(home=home, port=0)
    prepare_home(settings)
    config = DemoConfig(requests=requests, rate=rate, drift_at=0.2)
    with embedded_stack(settings) as s:
        served = (
            s
            if follow_events
            else s.model_copy(
                update={
                    "topic_model_events": s.topic_model_events + ".unused",
                    "registry_poll_s": BASELINE_POLL_S,
                }
            )
        )
        with running_loop(s, served) as (_, learner, url):
            result, _ = simulate_app(url, s, config)
        history = list(learner.stats.history)
        learned = learned_examples(s)
    fresh = freshness(
        result.trace, learned, [(c.version, c.last_id) for c in history if c.promoted and c.version]
    )
    fresh.sort()
    return {
        "median_s": round(statistics.median(fresh), 2) if fresh else None,
        "p95_s": round(fresh[int(0.95 * (len(fresh) - 1))], 2) if fresh else None,
        "corrections_measured": len(fresh),
        "candidates": len(history),
        "promoted": sum(c.promoted for c in history),
        "stream_s": round(result.elapsed_s, 1),
    }


def main(
    requests: int = typer.Option(5400, min=100, help="Requests the app sends per run."),
    rate: float = typer.Option(60.0, min=1.0, help="Requests per second."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON."),
) -> None:
    """Freshness (correction -> served model trained on it), events vs polling only."""
    from rich.console import Console

    console = Console(stderr=True)
    out: dict[str, Any] = {
        "requests": requests,
        "rate": rate,
        "learn_batch": 100,
        "baseline_poll_s": BASELINE_POLL_S,
    }
    for name, events in (("ours", True), ("poll_only", False)):
        with (
            tempfile.TemporaryDirectory(prefix="fw-bench-fresh-") as tmp,
            console.status(f"running the loop ({name}, ~{requests / rate:.0f} s)..."),
        ):
            out[name] = run_loop(Path(tmp) / "home", requests, rate, events)
    ours, base = out["ours"]["median_s"], out["poll_only"]["median_s"]
    out["median_ratio_vs_poll_only"] = round(ours / base, 3) if ours and base else None
    out["target_median_s"] = TARGET_MEDIAN_S
    out["target_met"] = ours is not None and ours <= TARGET_MEDIAN_S
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for name in ("ours", "poll_only"):
        r = out[name]
        console.print(
            f"{name:>10}: median {r['median_s']} s, p95 {r['p95_s']} s over "
            f"{r['corrections_measured']} corrections; {r['promoted']} of "
            f"{r['candidates']} candidates promoted"
        )
    console.print(
        f"median ours / poll-only: {out['median_ratio_vs_poll_only']}  "
        f"(target: median <= {TARGET_MEDIAN_S} s: "
        f"{'met' if out['target_met'] else 'NOT met'})"
    )
