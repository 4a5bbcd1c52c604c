"""`python -m bench elastic`: samples to recover after an abrupt drift, elastic vs fixed rate.

One abrupt concept change per scenario: the demo's `seed_concept(7) -> drift_concept(7)`
(a new RBF concept on shifted inputs, so the shift score fires too), SEA variant 2 -> 3
(threshold 7 -> 9.5) and Agrawal function 0 -> 2 (the same inputs, new labels: only the
error signal can tell). Our learner runs the production loop (per batch of N:
predict, `observe_errors`, `observe_inputs`, `update`) in two arms, the same learner and
configuration except:

* "elastic": `TrainerConfig(elastic=True, lr=r)`, the whole drift response of
  learner/trainer.py: the detector-driven rate (ADWIN on the errors, shift score on the
  inputs; boost capped at `max_lr`), the examples since the change trained on while the boost
  lasts (with steps scaled by it), and replay only from examples since an error drift;
* "fixed": `TrainerConfig(elastic=False, lr=r)`, a fixed rate r and no drift response (the
  detectors are not fed; replay is a uniform sample of all history).

After every update the model is also scored on a held-out sample of the concept in
force, so recovery is read off without a rolling window's lag:

* pre-drift accuracy = mean held-out accuracy (old concept) after the last 5 updates
  before the drift, the last of them having trained on everything up to the drift;
* recovery = post-drift samples trained on until held-out accuracy on the new concept
  first reaches 95 % of that, checked after every update (0 if the model at the drift
  already scores that; the post-drift length if it never does, flagged);
* the same on the prequential (test-then-train) stream, as a trailing window of W
  post-drift samples against the W samples before the drift (at least W by design).

"Best" = the rate with the highest overall prequential accuracy on the same stream
(mean over seeds), chosen separately among fixed rates and among elastic base rates.
ratio = best elastic recovery / best fixed recovery (target <= 0.5).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import typer

from bench._streams import (
    OurSetup,
    agrawal_rows,
    encode_agrawal,
    encode_indexed,
    take_rows,
)
from bench.harness import document, machine_line

SCENARIOS = ("demo", "sea", "agrawal", "sea-flip", "agrawal-flip")
REVERSALS = ("sea-flip", "agrawal-flip")  # label reversals: the ARF target applies to these
MODES = ("fixed", "elastic", "background")
ARF_TARGET = 1.0  # ours (the production drift response) / ARF, samples to recover
RATES = (0.001, 0.003, 0.01, 0.03)
RECOVERY_SHARE = 0.95
RATIO_TARGET = 0.5
PRE_UPDATES = 5  # held-out evaluations averaged for the pre-drift accuracy
SEA_SWITCH = (2, 3)
AGRAWAL_SWITCH = (0, 2)
DEMO_SEED = 7
CURVE_UPDATES = 30  # post-drift held-out points kept in the JSON for the two best configs
# --preset: "production" (the default) is what `flywheel learn` runs (TrainerConfig's
# defaults, the seed model's MLP 64-64); "bench" is the prequential benchmark's learner
# (bench/_streams.py: replay 0 sidesteps the old-concept replay), what the first results
# used. Explicit --steps/--replay/--hidden override either.
PRESETS: dict[str, dict[str, Any]] = {
    "bench": {"hidden": "32,32", "steps": None, "replay": None},
    "production": {"hidden": "64,64", "steps": 8, "replay": 2.0},
}


@dataclass
class Scenario:
    """A stream with one abrupt change at `drift`, plus held-out samples of both concepts."""

    name: str
    description: str
    x: np.ndarray
    y: np.ndarray
    n_labels: int
    drift: int
    holdout_before: tuple[np.ndarray, np.ndarray]
    holdout_after: tuple[np.ndarray, np.ndarray]


def make_scenario(name: str, before: int, after: int, holdout: int, seed: int) -> Scenario:
    """`before` samples of the old concept (warm-up included), then `after` of the new."""
    from river.datasets import synth

    from bench._streams import SEA_NOISE, sea_rows

    n = before + after
    if name == "demo":
        from flywheel.streams import LABELS, drift_concept, seed_concept

        old, new = seed_concept(DEMO_SEED), drift_concept(DEMO_SEED)

        def draw(concept: Any, k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
            x, names = concept.sample(k, sample_seed=s)
            return x, np.asarray([LABELS.index(v) for v in names], dtype=np.int64)

        xa, ya = draw(old, before, seed)
        xb, yb = draw(new, after, seed + 1)
        return Scenario(
            name,
            f"seed_concept({DEMO_SEED}) -> drift_concept({DEMO_SEED}): new "
            "RBF concept, inputs shifted by +0.5, 8 features, 3 classes",
            np.concatenate([xa, xb]),
            np.concatenate([ya, yb]),
            len(LABELS),
            before,
            draw(old, holdout, seed + 1000),
            draw(new, holdout, seed + 1001),
        )
    if name in REVERSALS:
        return _reversal(name, before, after, holdout, seed)
    if name == "sea":
        rows, y = take_rows(sea_rows(n, seed, SEA_SWITCH, [before]), n)

        def sea(v: int) -> tuple[np.ndarray, np.ndarray]:
            r, yy = take_rows(synth.SEA(variant=v, noise=SEA_NOISE, seed=seed + 1000 + v), holdout)
            return encode_indexed(r), yy

        return Scenario(
            name,
            f"SEA variant {SEA_SWITCH[0]} -> {SEA_SWITCH[1]} (x0 + x1 <= 7 "
            f"-> <= 9.5), {SEA_NOISE:.0%} label noise, same inputs",
            encode_indexed(rows),
            y,
            2,
            before,
            sea(SEA_SWITCH[0]),
            sea(SEA_SWITCH[1]),
        )
    if name == "agrawal":
        rows, y = take_rows(agrawal_rows(n, seed, AGRAWAL_SWITCH, [before]), n)

        def agr(f: int) -> tuple[np.ndarray, np.ndarray]:
            r, yy = take_rows(
                synth.Agrawal(classification_function=f, seed=seed + 1000 + f), holdout
            )
            return encode_agrawal(r), yy

        return Scenario(
            name,
            f"Agrawal function {AGRAWAL_SWITCH[0]} -> {AGRAWAL_SWITCH[1]}, "
            "same inputs, 48 % of labels agree",
            encode_agrawal(rows),
            y,
            2,
            before,
            agr(AGRAWAL_SWITCH[0]),
            agr(AGRAWAL_SWITCH[1]),
        )
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def _reversal(name: str, before: int, after: int, holdout: int, seed: int) -> Scenario:
    """One concept, then every label flipped: the inputs stay, only the errors tell."""
    from river.datasets import synth

    from bench._streams import SEA_NOISE

    if name == "sea-flip":
        variant = SEA_SWITCH[0]

        def draw(k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
            r, yy = take_rows(synth.SEA(variant=variant, noise=SEA_NOISE, seed=s), k)
            return encode_indexed(r), yy.astype(np.int64)

        text = f"SEA variant {variant}, {SEA_NOISE:.0%} label noise, then every label flipped"
    else:
        function = AGRAWAL_SWITCH[0]

        def draw(k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
            r, yy = take_rows(synth.Agrawal(classification_function=function, seed=s), k)
            return encode_agrawal(r), yy.astype(np.int64)

        text = f"Agrawal function {function}, then every label flipped"
    x, y = draw(before + after, seed)
    y = np.concatenate([y[:before], 1 - y[before:]])
    hx, hy = draw(holdout, seed + 1000)
    return Scenario(name, text, x, y, 2, before, (hx, hy), (hx, 1 - hy))


def run_arf(sc: Scenario, batch: int, warmup: int, seed: int) -> dict[str, Any]:
    """river's ARF on the same stream (predict_one, then learn_one), held-out scored after
    every `batch` samples as our learner is: the run dict `recovery` reads."""
    from river import forest

    model = forest.ARFClassifier(seed=seed)
    rows = [dict(enumerate(v.tolist())) for v in sc.x]
    hold = {
        key: ([dict(enumerate(v.tolist())) for v in hx], hy)
        for key, (hx, hy) in (("before", sc.holdout_before), ("after", sc.holdout_after))
    }

    def held_out(key: str) -> float:
        hx, hy = hold[key]
        return float(np.mean([model.predict_one(r) == t for r, t in zip(hx, hy, strict=True)]))

    correct = np.zeros(len(sc.y) - warmup, dtype=bool)
    ends: list[int] = []
    held: list[float] = []
    old_at_drift: float | None = None
    for i, (r, t) in enumerate(zip(rows, sc.y.tolist(), strict=True)):
        if i >= warmup:
            correct[i - warmup] = model.predict_one(r) == t
        model.learn_one(r, t)
        end = i + 1
        if end > warmup and (end - warmup) % batch == 0:
            ends.append(end)
            held.append(held_out("before" if end < sc.drift else "after"))
            if end == sc.drift:
                old_at_drift = held_out("before")
    return {
        "correct": correct,
        "ends": np.asarray(ends),
        "held": np.asarray(held),
        "held_old_at_drift": old_at_drift,
        "boost": np.ones(len(ends)),
    }


def run_one(sc: Scenario, config: Any, setup: OurSetup, warmup: int, seed: int) -> dict[str, Any]:
    """One prequential run with a held-out score after every update."""
    from bench._streams import run_ours

    ends: list[int] = []
    held: list[float] = []
    held_old_at_drift: list[float] = []
    boosts: list[float] = []

    def score(end: int, trainer: Any, stats: Any) -> None:
        hx, hy = sc.holdout_before if end < sc.drift else sc.holdout_after
        ends.append(end)
        held.append(float((trainer.predict(hx) == hy).mean()))
        boosts.append(float(stats.multiplier))
        if end == sc.drift:  # the last pre-drift model: its old-concept score too
            hx, hy = sc.holdout_before
            held_old_at_drift.append(float((trainer.predict(hx) == hy).mean()))

    correct = run_ours(sc.x, sc.y, sc.n_labels, config, setup, warmup, seed, score)
    return {
        "correct": correct,
        "ends": np.asarray(ends),
        "held": np.asarray(held),
        "held_old_at_drift": held_old_at_drift[0] if held_old_at_drift else None,
        "boost": np.asarray(boosts),
    }


def recovery(run: dict[str, Any], drift: int, warmup: int, window: int) -> dict[str, Any]:
    """Held-out and rolling-window recovery of one run (samples after the drift)."""
    ends, held = run["ends"], run["held"]
    pre_vals = list(held[ends < drift])
    if run["held_old_at_drift"] is not None:
        pre_vals.append(run["held_old_at_drift"])
    pre = float(np.mean(pre_vals[-PRE_UPDATES:]))
    post = ends >= drift
    post_ends, post_held = ends[post] - drift, held[post]
    hit = np.flatnonzero(post_held >= RECOVERY_SHARE * pre)
    after = int(post_ends[-1]) if len(post_ends) else 0
    held_rec = int(post_ends[hit[0]]) if len(hit) else after
    # prequential: trailing window of post-drift samples vs the window before the drift
    c = run["correct"].astype(np.float64)
    d = drift - warmup
    pre_roll = float(c[d - window : d].mean())
    csum = np.concatenate([[0.0], np.cumsum(c)])
    roll_rec = None
    for k in range(window, len(c) - d + 1):
        if (csum[d + k] - csum[d + k - window]) / window >= RECOVERY_SHARE * pre_roll:
            roll_rec = k
            break
    return {
        "pre_accuracy": pre,
        "lowest_after": float(post_held.min()) if len(post_held) else None,
        "recovery": held_rec,
        "recovered": bool(len(hit)),
        "rolling_pre_accuracy": pre_roll,
        "rolling_recovery": roll_rec if roll_rec is not None else len(c) - d,
        "rolling_recovered": roll_rec is not None,
        "prequential_accuracy": float(c.mean()),
        "max_boost_seen": float(run["boost"].max()),
    }


def summarize_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of one (mode, rate) cell; per-seed recoveries kept."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    return {
        "prequential_accuracy": mean("prequential_accuracy"),
        "pre_accuracy": mean("pre_accuracy"),
        "lowest_after": mean("lowest_after"),
        "recovery": mean("recovery"),
        "recovery_each": [r["recovery"] for r in runs],
        "recovered": sum(r["recovered"] for r in runs),
        "rolling_recovery": mean("rolling_recovery"),
        "rolling_recovered": sum(r["rolling_recovered"] for r in runs),
        "max_boost": mean("max_boost_seen"),
        "runs": len(runs),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else (1.0 if a == b else float("inf"))


def compare(
    cells: dict[str, dict[str, Any]], rates: list[float], *, reversal: bool = False
) -> dict[str, Any]:
    """Best fixed vs best elastic rate (each by prequential accuracy) and their ratios; the
    best background run (the production drift response) against ARF."""

    def best(mode: str) -> float:
        return max(rates, key=lambda r: cells[f"{mode}@{r:g}"]["prequential_accuracy"])

    bf, be, bb = best("fixed"), best("elastic"), best("background")
    fixed, elastic = cells[f"fixed@{bf:g}"], cells[f"elastic@{be:g}"]
    background, arf = cells[f"background@{bb:g}"], cells["arf"]
    same = cells[f"elastic@{bf:g}"]
    ratio = _ratio
    r = ratio(elastic["recovery"], fixed["recovery"])
    arf_ratio = ratio(background["recovery"], arf["recovery"])
    return {
        "best_background_lr": bb,
        "best_background_recovery": background["recovery"],
        "arf_recovery": arf["recovery"],
        "arf_ratio": arf_ratio,
        "arf_target": f"<= {ARF_TARGET}" if reversal else "(reversals only)",
        "arf_pass": arf_ratio <= ARF_TARGET if reversal else None,
        "background_vs_elastic": ratio(background["recovery"], elastic["recovery"]),
        "best_fixed_lr": bf,
        "best_elastic_lr": be,
        "best_fixed_recovery": fixed["recovery"],
        "best_elastic_recovery": elastic["recovery"],
        "ratio": r,
        "same_base_ratio": ratio(same["recovery"], fixed["recovery"]),
        "rolling_ratio": ratio(elastic["rolling_recovery"], fixed["rolling_recovery"]),
        "target": f"<= {RATIO_TARGET}",
        "pass": r <= RATIO_TARGET,
    }


def _mean_curve(curves: list[np.ndarray], batch: int) -> dict[str, list[float]]:
    """Held-out accuracy after 0, N, 2N, ... post-drift samples, mean over seeds."""
    n = min(len(c) for c in curves)
    return {
        "samples_after_drift": [k * batch for k in range(n)],
        "held_out_accuracy": np.mean([c[:n] for c in curves], axis=0).tolist(),
    }


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # never squeeze figures into "0.8…": a narrow terminal wraps the lines instead
    console.width = max(console.width, 130)
    cfg, m = doc["config"], doc["machine"]
    for sc in doc["scenarios"]:
        c = sc["comparison"]
        table = Table(
            title=f"{sc['name']}: {sc['description']}; drift after "
            f"{cfg['before']} samples, {cfg['after']} after, "
            f"seeds {', '.join(map(str, cfg['seeds']))} (means)"
        )
        for col in (
            "rate",
            "",
            "prequential acc",
            "pre-drift acc",
            "lowest after",
            "recovery (samples)",
            "per seed",
            "recovered",
            f"rolling {cfg['window']} recovery",
            "max boost",
        ):
            table.add_column(col, justify="left" if col == "rate" else "right", no_wrap=True)
        for key, cell in sc["cells"].items():
            mode, lr = key.split("@")
            best = (mode == "fixed" and float(lr) == c["best_fixed_lr"]) or (
                mode == "elastic" and float(lr) == c["best_elastic_lr"]
            )
            table.add_row(
                f"{mode} {lr}",
                "[bold]best[/]" if best else "",
                f"{cell['prequential_accuracy']:.4f}",
                f"{cell['pre_accuracy']:.3f}",
                f"{cell['lowest_after']:.3f}",
                f"{cell['recovery']:.0f}",
                " ".join(str(v) for v in cell["recovery_each"]),
                f"{cell['recovered']}/{cell['runs']}",
                f"{cell['rolling_recovery']:.0f}",
                f"{cell['max_boost']:.2f}",
            )
        console.print(table)
    summary = Table(
        title="elastic vs best fixed rate: samples to recover to "
        f"{RECOVERY_SHARE:.0%} of pre-drift held-out accuracy"
    )
    for col in (
        "scenario",
        "best fixed",
        "recovery",
        "best elastic",
        "recovery",
        "ratio",
        "same-base ratio",
        "rolling ratio",
        "target",
    ):
        summary.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for sc in doc["scenarios"]:
        c = sc["comparison"]
        verdict = "[green]PASS[/]" if c["pass"] else "[red]MISS[/]"
        summary.add_row(
            sc["name"],
            f"lr {c['best_fixed_lr']:g}",
            f"{c['best_fixed_recovery']:.0f}",
            f"lr {c['best_elastic_lr']:g}",
            f"{c['best_elastic_recovery']:.0f}",
            f"[bold]{c['ratio']:.2f}[/]",
            f"{c['same_base_ratio']:.2f}",
            f"{c['rolling_ratio']:.2f}",
            f"{c['target']} {verdict}",
        )
    console.print(summary)
    versus = Table(
        title="production drift response (elastic + background line) vs river ARF: samples "
        "to recover, same stream"
    )
    for col in ("scenario", "background lr", "recovery", "elastic alone", "ARF", "ratio", "target"):
        versus.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for sc in doc["scenarios"]:
        c = sc["comparison"]
        verdict = {True: "[green]PASS[/]", False: "[red]MISS[/]", None: ""}[c["arf_pass"]]
        versus.add_row(
            sc["name"],
            f"{c['best_background_lr']:g}",
            f"{c['best_background_recovery']:.0f}",
            f"{c['best_elastic_recovery']:.0f}",
            f"{c['arf_recovery']:.0f}",
            f"[bold]{c['arf_ratio']:.2f}[/]",
            f"{c['arf_target']} {verdict}",
        )
    console.print(versus)
    ours = cfg["ours"]
    console.print(
        f"ours: MLP {ours['hidden']}, N={ours['batch']}, TrainerConfig("
        f"{', '.join(f'{k}={v}' for k, v in ours['trainer'].items() if k != 'lr')}"
        f"), lr in {cfg['rates']} (preset {cfg.get('preset', 'bench')}); best = "
        "highest prequential accuracy"
    )
    console.print(
        "elastic = the whole drift response (capped detector-driven rate, examples "
        "since the change while boosted, replay only since an error drift); "
        "fixed = the same learner, fixed rate, no drift response"
    )
    s = doc["summary"]
    console.print(
        f"target met on {s['scenarios_passed']}/{len(doc['scenarios'])} scenarios; "
        f"{s['runtime_s']:.0f}s in all"
    )
    console.print(machine_line(m, doc["date"]))


def main(
    scenarios: str = typer.Option(
        ",".join(SCENARIOS),
        "--scenarios",
        help="Comma-separated subset of " + ", ".join(SCENARIOS) + ".",
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, max=20, help="Seeds averaged per cell."),
    seed: int = typer.Option(7, help="First seed (seeds seed..seed+K-1; tuning used 1-3)."),
    before: int = typer.Option(
        4000, "--before", min=200, help="Samples of the old concept, warm-up included."
    ),
    after: int = typer.Option(5000, "--after", min=100, help="Samples of the new concept."),
    warmup: int = typer.Option(1000, "--warmup", min=100, help="Warm-up samples."),
    holdout: int = typer.Option(2000, "--holdout", min=100, help="Held-out samples per concept."),
    window: int = typer.Option(
        500, "--window", min=10, help="Rolling window (samples) of the prequential recovery."
    ),
    rates: str = typer.Option(
        ",".join(f"{r:g}" for r in RATES),
        "--rates",
        help="Learning rates, fixed and as the elastic base.",
    ),
    preset: str = typer.Option(
        "production",
        "--preset",
        help="bench: MLP 32-32, steps 16, replay 0 (the prequential benchmark's learner); "
        "production: MLP 64-64, steps 8, replay 2 (what `flywheel learn` runs).",
    ),
    hidden: str | None = typer.Option(None, help="Hidden layer widths of our MLP (preset's)."),
    batch: int = typer.Option(100, "--batch", min=1, help="N: new examples per update."),
    steps: int | None = typer.Option(None, help="TrainerConfig.steps (preset's: 16 or 8)."),
    replay: float | None = typer.Option(None, help="TrainerConfig.replay (preset's: 0 or 2)."),
    max_boost: float | None = typer.Option(None, help="TrainerConfig.max_boost (default 3)."),
    half_life: float | None = typer.Option(None, help="TrainerConfig.half_life (default 3)."),
    max_lr: float | None = typer.Option(
        None, "--max-lr", help="TrainerConfig.max_lr, the boosted rate's cap (default 0.01)."
    ),
    boost_window: int | None = typer.Option(
        None,
        "--boost-window",
        min=0,
        help="TrainerConfig.boost_window (default 1000; 0: no example boost).",
    ),
    boost_steps: bool | None = typer.Option(
        None, "--boost-steps/--no-boost-steps", help="TrainerConfig.boost_steps (default on)."
    ),
    drift_replay: bool | None = typer.Option(
        None, "--drift-replay/--no-drift-replay", help="TrainerConfig.drift_replay (default on)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Samples to recover after an abrupt drift: elastic rate vs the best fixed rate."""
    from bench._streams import (
        config_dict,
        one_thread,
        parse_ints,
        progress,
        trainer_config,
    )
    from bench.harness import machine
    from flywheel.learner import BackgroundConfig

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise typer.BadParameter(f"unknown scenario: {', '.join(bad) or '(none)'}")
    rate_list = sorted({float(r) for r in rates.split(",") if r.strip()})
    if not rate_list or min(rate_list) <= 0:
        raise typer.BadParameter("--rates needs positive learning rates")
    if before - warmup < max(window, PRE_UPDATES * batch):
        raise typer.BadParameter(
            f"--before must leave room for the warm-up and then "
            f"{PRE_UPDATES} updates and one window before the drift"
        )
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    hidden = chosen["hidden"] if hidden is None else hidden
    steps = chosen["steps"] if steps is None else steps
    replay = chosen["replay"] if replay is None else replay
    setup = OurSetup(hidden=parse_ints(hidden), batch=batch)
    knobs = {
        "steps": steps,
        "replay": replay,
        "max_boost": max_boost,
        "half_life": half_life,
        "max_lr": max_lr,
        "boost_window": boost_window,
        "boost_steps": boost_steps,
        "drift_replay": drift_replay,
    }
    started = time.perf_counter()
    seed_list = [seed + k for k in range(seeds)]
    grid = [(mode, lr) for mode in MODES for lr in rate_list]
    interactive = sys.stderr.isatty()
    results = []
    with one_thread(), progress(interactive) as bar:
        info = machine()
        for name in names:
            task = bar.add_task(f"{name}", total=len(seed_list) * (len(grid) + 1))
            per_cell: dict[str, list[dict[str, Any]]] = {f"{m}@{lr:g}": [] for m, lr in grid}
            per_cell["arf"] = []
            curves: dict[str, list[np.ndarray]] = {k: [] for k in per_cell}
            for sd in seed_list:
                sc = make_scenario(name, before, after, holdout, sd)
                arf = run_arf(sc, batch, warmup, sd)
                per_cell["arf"].append(recovery(arf, sc.drift, warmup, window))
                curves["arf"].append(arf["held"][arf["ends"] >= sc.drift][: CURVE_UPDATES + 1])
                bar.advance(task)
                for mode, lr in grid:
                    config = trainer_config(
                        lr=lr,
                        elastic=mode != "fixed",
                        background=BackgroundConfig() if mode == "background" else None,
                        **knobs,
                    )
                    run = run_one(sc, config, setup, warmup, sd)
                    rec = recovery(run, sc.drift, warmup, window)
                    per_cell[f"{mode}@{lr:g}"].append(rec)
                    curves[f"{mode}@{lr:g}"].append(
                        run["held"][run["ends"] >= sc.drift][: CURVE_UPDATES + 1]
                    )
                    bar.advance(task)
                    if not interactive:
                        print(
                            f"{name} seed {sd} {mode} lr {lr:g}: recovery "
                            f"{rec['recovery']} ({'recovered' if rec['recovered'] else 'NOT'})"
                            f", prequential {rec['prequential_accuracy']:.4f}",
                            file=sys.stderr,
                        )
            cells = {k: summarize_cell(v) for k, v in per_cell.items()}
            comparison = compare(cells, rate_list, reversal=name in REVERSALS)
            best = {
                "fixed": f"fixed@{comparison['best_fixed_lr']:g}",
                "elastic": f"elastic@{comparison['best_elastic_lr']:g}",
                "background": f"background@{comparison['best_background_lr']:g}",
                "arf": "arf",
            }
            results.append(
                {
                    "name": name,
                    "description": sc.description,
                    "drift_at": sc.drift,
                    "cells": cells,
                    "comparison": comparison,
                    "curves": {mode: _mean_curve(curves[key], batch) for mode, key in best.items()},
                }
            )
    example = trainer_config(lr=rate_list[0], **knobs)
    doc = document(
        "elastic",
        info,
        {
            "config": {
                "before": before,
                "after": after,
                "warmup": warmup,
                "holdout": holdout,
                "window": window,
                "seeds": seed_list,
                "rates": rate_list,
                "preset": preset,
                "arms": {
                    "elastic": "TrainerConfig(elastic=True): detector-driven rate (capped) + "
                    "examples since the change while boosted + replay only "
                    "since an error drift",
                    "fixed": "TrainerConfig(elastic=False): fixed rate, no drift response",
                    "background": "elastic + a background line on a drift warning "
                    "(learner/background.py, BackgroundConfig defaults): the production "
                    "default",
                    "arf": "river ARFClassifier(seed=seed), predict_one/learn_one, held-out "
                    "scored every N samples",
                },
                "recovery_share": RECOVERY_SHARE,
                "pre_updates": PRE_UPDATES,
                "ours": {
                    "hidden": list(setup.hidden),
                    "batch": setup.batch,
                    "trainer": {
                        k: v for k, v in config_dict(example).items() if k not in ("lr", "elastic")
                    },
                    "warm_start": f"Standardize.fit + {setup.warm_epochs} epochs Adam "
                    f"lr {setup.warm_lr:g} batch {setup.warm_batch}",
                },
                "best": "the rate with the highest prequential accuracy over the whole stream "
                "(mean over seeds), among fixed rates and among elastic base rates",
                "recovery": f"post-drift samples trained on until held-out accuracy on the new "
                f"concept >= {RECOVERY_SHARE} x mean held-out accuracy of the last "
                f"{PRE_UPDATES} pre-drift updates; the post-drift length if never",
            },
            "scenarios": results,
            "summary": {
                "scenarios_passed": sum(r["comparison"]["pass"] for r in results),
                "all_pass": all(r["comparison"]["pass"] for r in results),
                "arf_passed": [r["name"] for r in results if r["comparison"]["arf_pass"]],
                "arf_missed": [r["name"] for r in results if r["comparison"]["arf_pass"] is False],
                "runtime_s": time.perf_counter() - started,
            },
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
