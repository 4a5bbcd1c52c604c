"""`python -m bench canary`: live sequential decisions against the offline gate (issue 28).

A SEA stream with a drift (river's `synth.SEA`, 10 % label noise, variant 0 -> 1: the
threshold on x0 + x1 moves from 8 to 9). Per seed two models are fitted as the
benchmarks' learner starts (`bench._streams.warm_model`, 2,000 rows each): `old` on the
concept before the drift, `new` on the concept after it. Then, on fresh rows drawn as
live traffic:

* promote: `new` as the shadow against `old` as champion, on traffic after the drift (the
  shadow is better);
* roll back: `new` as champion against `old` as its guard, on traffic of the old concept
  (the drift reversed: the champion a promotion put in place is worse than the guard);
* A/A: two models of the same concept (`old`, and `old` fitted with another seed), each
  label's pair of outcomes swapped between them by a fair coin, so the two are exactly
  equally accurate with the models' real discordance.

Each trial resamples the traffic's order and runs the live judge's test
(`flywheel.learner.judge_counts`, the same code `LiveJudge.step` runs) every `--look`
paired labels, up to `--labels`: the labels it needs to decide, and which way. The
offline gate on the same pair (learner/gate.py's rule on the recent holdout: more
accurate, or as accurate with lower log-loss) reads FLYWHEEL_GATE_RECENT_HOLDOUT rows
(500) of holdout corrections, which are FLYWHEEL_HOLDOUT_FRACTION (0.1) of all
corrections, and decides at FLYWHEEL_GATE_MIN_HOLDOUT (20) rows already: the labels it
needs, and how often it decides right at each, side by side.

Labels are paired labels for the live test: a shadow or guard is paired on
FLYWHEEL_LIVE_SHADOW_SHARE (0.1) of requests, so the corrections it needs are the paired
labels / 0.1; the JSON gives both.

The cost of a shadow to `/v1/predict` is measured in the same run by the serving benchmark
(`bench serve --compare shadow`, started as its own process: a fresh server per round,
the champion alone against champion + shadow at the default share), its summary in
`shadow_throughput` (target: ≥ 0.9× the champion alone); `--no-shadow-throughput` skips it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import typer

from bench.harness import document, machine

OLD_VARIANT, NEW_VARIANT = 0, 1  # SEA thresholds 8 -> 9
TRAIN_ROWS = 2000
TRAFFIC_ROWS = 20_000


def _concept(variant: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from river.datasets import synth

    from bench._streams import SEA_NOISE, encode_indexed, take_rows

    rows, y = take_rows(synth.SEA(variant=variant, noise=SEA_NOISE, seed=seed), n)
    return encode_indexed(rows), y


def _scored(module: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: right or not, and the log-loss of the true label."""
    import torch

    with torch.no_grad():
        p = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    right = p.argmax(1) == y
    loss = -np.log(np.maximum(p[np.arange(len(y)), y], 1e-15))
    return right, loss


def sequential(
    rng: np.random.Generator,
    a: np.ndarray,
    b: np.ndarray,
    *,
    role: str,
    alpha: float,
    labels: int,
    look: int,
    swap: bool = False,
) -> tuple[int | None, str | None]:
    """Labels until the live test on (role holder a, champion b) decides, and what it
    would do; (None, None) if it has not within `labels`. `swap`: an A/A trial."""
    from flywheel.learner import judge_counts
    from flywheel.store import PairedCounts

    idx = rng.integers(0, len(a), labels)
    ra, rb = a[idx], b[idx]
    if swap:
        flip = rng.random(labels) < 0.5
        ra, rb = np.where(flip, rb, ra), np.where(flip, ra, rb)
    a_only, b_only = np.cumsum(ra & ~rb), np.cumsum(rb & ~ra)
    for n in range(look, labels + 1, look):
        counts = PairedCounts(labels=n, a_only=int(a_only[n - 1]), b_only=int(b_only[n - 1]))
        verdict = judge_counts(role, counts, alpha)
        if verdict.decision is not None:
            return n, verdict.would
    return None, None


def gate_passes(
    rng: np.random.Generator,
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    rows: int,
    swap: bool = False,
) -> bool:
    """The gate's recent-data rule on `rows` holdout rows: a passes against b iff it is
    more accurate, or as accurate with a lower mean log-loss (learner/gate.py)."""
    idx = rng.integers(0, len(a[0]), rows)
    (ra, la), (rb, lb) = (a[0][idx], a[1][idx]), (b[0][idx], b[1][idx])
    if swap:
        flip = rng.random(rows) < 0.5
        ra, rb = np.where(flip, rb, ra), np.where(flip, ra, rb)
        la, lb = np.where(flip, lb, la), np.where(flip, la, lb)
    acc_a, acc_b = ra.mean(), rb.mean()
    return bool(acc_a > acc_b or (acc_a == acc_b and la.mean() < lb.mean()))


def _summary(results: list[tuple[int | None, str | None]], right: str) -> dict[str, Any]:
    decided = [n for n, _ in results if n is not None]
    trials = len(results)
    return {
        "trials": trials,
        "decided": len(decided),
        "right": sum(a == right for _, a in results),
        "wrong": sum(a is not None and a != right for _, a in results),
        "median_labels": float(np.median(decided)) if decided else None,
        "p90_labels": float(np.percentile(decided, 90)) if decided else None,
    }


def main(
    seeds: str = typer.Option("1,2,3", help="Comma-separated seeds (a model pair per seed)."),
    trials: int = typer.Option(100, min=1, help="Trials per seed for promote and roll back."),
    aa_trials: int = typer.Option(1000, min=1, help="A/A trials in all."),
    labels: int = typer.Option(20_000, min=100, help="Paired labels each trial may read."),
    look: int = typer.Option(50, min=1, help="Paired labels between two reads."),
    shadow_throughput: bool = typer.Option(
        True, help="Also measure a shadow's cost to /v1/predict (bench serve --compare shadow)."
    ),
    serve_duration: float = typer.Option(6.0, min=1, help="Seconds per serving round."),
    serve_rounds: int = typer.Option(3, min=1, help="Serving rounds per side."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """Labels to promote a better candidate and roll back a worse champion, live
    sequential test vs the offline gate; false decisions in A/A trials."""
    from bench._streams import OurSetup, parse_ints, warm_model
    from flywheel.settings import Settings

    started = time.perf_counter()
    settings = Settings(home="/nonexistent/bench-canary")
    alpha, share = settings.live_alpha, settings.live_shadow_share
    fraction = settings.holdout_fraction
    min_rows, window = settings.gate_min_holdout, settings.gate_recent_holdout
    setup = OurSetup(warm_batch=128)  # 160 Adam steps a model: the fit is not measured
    seed_list = parse_ints(seeds)
    promote_runs: list[tuple[int | None, str | None]] = []
    rollback_runs: list[tuple[int | None, str | None]] = []
    aa_runs: list[tuple[int | None, str | None]] = []
    gate = {"promote": [0, 0], "rollback": [0, 0], "aa": [0, 0]}  # passes at min, window
    models: list[dict[str, Any]] = []
    for k, seed in enumerate(seed_list):
        per_seed_aa = aa_trials // len(seed_list) + (k < aa_trials % len(seed_list))
        x_old, y_old = _concept(OLD_VARIANT, TRAIN_ROWS, seed)
        x_new, y_new = _concept(NEW_VARIANT, TRAIN_ROWS, seed + 1)
        old = warm_model(x_old, y_old, 2, setup, seed)
        old2 = warm_model(x_old, y_old, 2, setup, seed + 1000)
        new = warm_model(x_new, y_new, 2, setup, seed)
        live_new = _concept(NEW_VARIANT, TRAFFIC_ROWS, seed + 2)
        live_old = _concept(OLD_VARIANT, TRAFFIC_ROWS, seed + 3)
        new_on_new, old_on_new = _scored(new, *live_new), _scored(old, *live_new)
        new_on_old, old_on_old = _scored(new, *live_old), _scored(old, *live_old)
        old2_on_old = _scored(old2, *live_old)
        models.append(
            {
                "seed": seed,
                "after_drift": {
                    "shadow_new": float(new_on_new[0].mean()),
                    "champion_old": float(old_on_new[0].mean()),
                },
                "drift_reversed": {
                    "guard_old": float(old_on_old[0].mean()),
                    "champion_new": float(new_on_old[0].mean()),
                },
                "aa": {
                    "a": float(old_on_old[0].mean()),
                    "b": float(old2_on_old[0].mean()),
                    "discordant": float((old_on_old[0] != old2_on_old[0]).mean()),
                },
            }
        )
        rng = np.random.default_rng(seed)
        for _ in range(trials):
            promote_runs.append(
                sequential(
                    rng, new_on_new[0], old_on_new[0], role="shadow", alpha=alpha,
                    labels=labels, look=look,
                )
            )  # fmt: skip
            rollback_runs.append(
                sequential(
                    rng, old_on_old[0], new_on_old[0], role="guard", alpha=alpha,
                    labels=labels, look=look,
                )
            )  # fmt: skip
            for i, rows in enumerate((min_rows, window)):
                gate["promote"][i] += gate_passes(rng, new_on_new, old_on_new, rows)
                # the gate's view of the worse champion: would it have passed it?
                gate["rollback"][i] += gate_passes(rng, new_on_old, old_on_old, rows)
        for _ in range(per_seed_aa):
            aa_runs.append(
                sequential(
                    rng, old_on_old[0], old2_on_old[0], role="shadow", alpha=alpha,
                    labels=labels, look=look, swap=True,
                )
            )  # fmt: skip
            for i, rows in enumerate((min_rows, window)):
                gate["aa"][i] += gate_passes(rng, old_on_old, old2_on_old, rows, swap=True)
    pair_trials = trials * len(seed_list)
    aa_n = len(aa_runs)
    false = sum(n is not None for n, _ in aa_runs)
    rate = false / aa_n
    se = float(np.sqrt(alpha * (1 - alpha) / aa_n))

    def gate_doc(key: str, n: int, passing_is_right: bool) -> dict[str, Any]:
        at_min, at_window = gate[key]
        return {
            "labels_at_min": round(min_rows / fraction),
            "labels_at_window": round(window / fraction),
            "pass_rate_at_min": at_min / n,
            "pass_rate_at_window": at_window / n,
            "right_at_min": (at_min if passing_is_right else n - at_min) / n,
            "right_at_window": (at_window if passing_is_right else n - at_window) / n,
        }

    def live_doc(runs: list[tuple[int | None, str | None]], right: str) -> dict[str, Any]:
        doc = _summary(runs, right)
        med = doc["median_labels"]
        doc["median_corrections_at_share"] = None if med is None else med / share
        return doc

    fields = {
        "config": {
            "stream": f"river SEA, variant {OLD_VARIANT} -> {NEW_VARIANT}, 10 % label noise",
            "seeds": list(seed_list),
            "train_rows": TRAIN_ROWS,
            "traffic_rows": TRAFFIC_ROWS,
            "trials_per_seed": trials,
            "labels": labels,
            "look": look,
            "alpha": alpha,
            "live_shadow_share": share,
            "holdout_fraction": fraction,
            "gate_min_holdout": min_rows,
            "gate_recent_holdout": window,
        },
        "models": models,
        "promote": {
            "live": live_doc(promote_runs, "promoted"),
            "gate": gate_doc("promote", pair_trials, True),
        },
        "rollback": {
            "live": live_doc(rollback_runs, "rolled_back"),
            "gate": gate_doc("rollback", pair_trials, False),
        },
        "aa": {
            "trials": aa_n,
            "false_decisions": false,
            "rate": rate,
            "alpha": alpha,
            "standard_error": se,
            "at_or_below_alpha": rate <= alpha + 2 * se,
            "gate_false_pass_at_min": gate["aa"][0] / aa_n,
            "gate_false_pass_at_window": gate["aa"][1] / aa_n,
        },
        "shadow_throughput": (
            _shadow_throughput(serve_duration, serve_rounds) if shadow_throughput else None
        ),
        "seconds": time.perf_counter() - started,
    }
    doc = document("canary", machine(), fields)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    p, r, a = fields["promote"], fields["rollback"], fields["aa"]
    lines = [
        f"canary: alpha {alpha}, {pair_trials} trials per pair, {aa_n} A/A trials",
        f"promote (live): median {p['live']['median_labels']} paired labels, "
        f"{p['live']['right']}/{pair_trials} right, {p['live']['wrong']} wrong; "
        f"gate: {p['gate']['labels_at_min']} labels ({p['gate']['right_at_min']:.2f} right) / "
        f"{p['gate']['labels_at_window']} labels ({p['gate']['right_at_window']:.2f} right)",
        f"roll back (live): median {r['live']['median_labels']} paired labels, "
        f"{r['live']['right']}/{pair_trials} right; gate would have refused the worse "
        f"champion: {r['gate']['right_at_min']:.2f} at {r['gate']['labels_at_min']} labels, "
        f"{r['gate']['right_at_window']:.2f} at {r['gate']['labels_at_window']}",
        f"A/A: {false}/{aa_n} decided ({rate:.3f}, alpha {alpha}); the gate passes "
        f"{a['gate_false_pass_at_min']:.2f} / {a['gate_false_pass_at_window']:.2f}",
    ]
    t = fields["shadow_throughput"]
    if t is not None:
        lines.append(
            f"shadow at share {share}: throughput {t['throughput_ratio']:.2f}x the champion "
            f"alone (target >= {t['target']}), p99 {t['p99_ratio']:.2f}x"
        )
    sys.stdout.write("\n".join(lines) + "\n")


def _shadow_throughput(duration_s: float, rounds: int) -> dict[str, Any]:
    """`bench serve --compare shadow`'s summary, run as its own process (it pins and
    starts servers of its own)."""
    import subprocess

    argv = [sys.executable, "-m", "bench", "serve", "--compare", "shadow", "--json"]
    argv += ["--duration", str(duration_s), "--rounds", str(rounds)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench serve --compare shadow failed: {out.stderr[-2000:]}")
    summary = json.loads(out.stdout)["summary"]
    ratio = float(summary["throughput_ratio"])
    return {
        "command": " ".join(argv[1:]),
        "throughput_ratio": ratio,
        "p99_ratio": float(summary["p99_ratio"]),
        "target": 0.9,
        "met": ratio >= 0.9,
        "summary": summary,
    }
