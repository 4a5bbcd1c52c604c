"""`python -m bench prequential`: prequential accuracy of our learner against river's.

Three river drift streams (SEA with abrupt variant switches, Hyperplane with gradual
drift, Agrawal with abrupt function switches) are drawn once each, and every learner
replays exactly the same examples in the same order. With `--datasets NAME,...` the
streams are real data sets shipped offline (`flywheel.demo.DATASETS`: named, categorical
and missing features), each seed a different order of its rows:

* ours: the MLP of `flywheel.modelspec` driven by `OnlineTrainer` as `learner/online.py`
  drives it, per batch of N: predict the batch (test), then `observe_errors` (its
  mistakes), `observe_inputs`, `update` (train);
  on a data set, "ours" is the model `flywheel init` would make: the default spec of the
  schema inferred from the warm-up rows (an embedding + MLP when there are categorical
  features, else an MLP of two 64-wide layers, and a logistic regression beside it, the
  two mixed by their prequential mistakes: `flywheel.modelspec.Blend`), over the schema's
  raw vectors; `--no-linear-head` measures the MLP alone;
* river, one example at a time: `predict_one` then `learn_one` (standard prequential),
  with river's defaults: LogisticRegression behind a StandardScaler (as river's docs
  recommend; on a data set, numeric columns scaled and categorical ones one-hot encoded,
  one-vs-rest for more than two classes), HoeffdingAdaptiveTreeClassifier and
  ARFClassifier (both take the categorical values as they are). River sees a missing
  value as an absent key.

All learners may use the first W examples to start (ours: input scaling fit plus a few
epochs; river: `learn_one` on each; on a data set W is at most a fifth of its rows);
accuracy counts every example after them. Targets per stream: ours >= LogisticRegression,
ours >= HAT, ours >= ARF - 1 point.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import typer

from bench._streams import STREAMS, OurSetup, Stream, dataset_warmup, parse_ints
from bench.harness import document, machine_line

BASELINES = ("logreg", "hat", "arf")
LABELS = {
    "ours": "ours (OnlineTrainer MLP)",
    "logreg": "river LogisticRegression",
    "hat": "river HAT",
    "arf": "river ARF",
}
ARF_MARGIN = 0.01  # ours may trail ARF by at most 1 point
PROGRESS_EVERY = 250  # river samples between progress-bar updates


def _pick(keys: tuple[str, ...]) -> Any:
    """river's `compose.Select`, except that a missing value (an absent key) stays absent
    (Select raises KeyError on it)."""
    from river import compose

    wanted = frozenset(keys)
    return compose.FuncTransformer(lambda x: {k: v for k, v in x.items() if k in wanted})


def river_model(name: str, seed: int, stream: Stream | None = None) -> Any:
    """river's defaults; the scaler is the pipeline river's docs use for linear models. On
    a data set (`stream.categorical` or more than two classes), LogisticRegression gets
    the numeric columns scaled and the categorical ones one-hot encoded, one-vs-rest."""
    from river import compose, forest, linear_model, multiclass, preprocessing, tree

    if name == "logreg":
        if stream is None or not (stream.categorical or stream.n_labels > 2):
            return preprocessing.StandardScaler() | linear_model.LogisticRegression()
        parts = []
        if stream.numeric:
            parts.append(_pick(stream.numeric) | preprocessing.StandardScaler())
        if stream.categorical:
            parts.append(_pick(stream.categorical) | preprocessing.OneHotEncoder())
        encode = parts[0] if len(parts) == 1 else compose.TransformerUnion(*parts)
        clf: Any = linear_model.LogisticRegression()
        if stream.n_labels > 2:
            clf = multiclass.OneVsRestClassifier(clf)
        return encode | clf
    if name == "hat":
        return tree.HoeffdingAdaptiveTreeClassifier(seed=seed)
    if name == "arf":
        return forest.ARFClassifier(seed=seed)
    raise ValueError(name)


def run_river(name: str, stream: Stream, warmup: int, seed: int, tick: Any = None) -> np.ndarray:
    """learn_one on the warm-up, then predict_one / learn_one; one bool per later sample."""
    model = river_model(name, seed, stream)
    correct = np.zeros(len(stream) - warmup, dtype=bool)
    labels = stream.y.tolist()
    for i, (x, y) in enumerate(zip(stream.rows, labels, strict=True)):
        if i >= warmup:
            correct[i - warmup] = model.predict_one(x) == y
        model.learn_one(x, y)
        if tick is not None and i % PROGRESS_EVERY == PROGRESS_EVERY - 1:
            tick(PROGRESS_EVERY)
    if tick is not None:
        tick(len(labels) % PROGRESS_EVERY)
    return correct


def segments(correct: np.ndarray, stream: Stream, warmup: int) -> list[dict[str, Any]]:
    """Accuracy per concept (between abrupt drifts) or per quarter (gradual drift)."""
    n = len(stream)
    cuts = stream.drifts or [n * k // 4 for k in (1, 2, 3)]
    bounds = sorted({warmup, n, *(c for c in cuts if warmup < c < n)})
    return [
        {"start": a, "end": b, "accuracy": float(correct[a - warmup : b - warmup].mean())}
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def judge(acc: dict[str, float]) -> dict[str, dict[str, Any]]:
    ours = acc["ours"]
    out = {}
    for base in BASELINES:
        if base not in acc:
            continue
        margin = ARF_MARGIN if base == "arf" else 0.0
        out[f"vs_{base}"] = {
            "target": f"ours >= {base}" + (f" - {margin:g}" if margin else ""),
            "difference_points": 100 * (ours - acc[base]),
            "ratio": ours / acc[base] if acc[base] else float("inf"),
            "pass": ours >= acc[base] - margin - 1e-12,
        }
    return out


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # never squeeze figures into "0.8…": a narrow terminal wraps the lines instead
    console.width = max(console.width, 130)
    cfg, m = doc["config"], doc["machine"]
    seeds = cfg["seeds"]
    table = Table(
        title="prequential accuracy (rows counted / first W warm-up rows, not counted), "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    )
    for col in (
        "stream",
        "rows / W",
        "ours",
        "LogReg",
        "HAT",
        "ARF",
        "ours - LogReg",
        "ours - HAT",
        "ours - ARF",
        "ours / ARF",
        "targets",
    ):
        table.add_column(col, justify="left" if col == "stream" else "right", no_wrap=True)
    for s in doc["streams"]:
        acc, t = s["accuracy"], s["targets"]

        def diff(base: str, t: dict[str, Any] = t) -> str:
            key = f"vs_{base}"
            if key not in t:
                return "-"
            color = "green" if t[key]["pass"] else "red"
            return f"[{color}]{t[key]['difference_points']:+.2f}[/]"

        verdict = {True: "[green]PASS[/]", False: "[red]MISS[/]", None: "-"}[s["pass"]]
        ratio = f"{t['vs_arf']['ratio']:.3f}" if "vs_arf" in t else "-"
        table.add_row(
            s["name"],
            f"{s['measured']} / {s['warmup']}",
            f"[bold]{acc['ours']:.4f}[/]",
            *(f"{acc[b]:.4f}" if b in acc else "-" for b in BASELINES),
            diff("logreg"),
            diff("hat"),
            diff("arf"),
            ratio,
            verdict,
        )
    console.print(table)
    seg = Table(
        title="accuracy per concept (abrupt streams) or quarter (Hyperplane), "
        f"seed {seeds[0]}; seconds per learner for the whole stream"
    )
    seg.add_column("stream / learner")
    n_seg = max(len(s["runs"][0]["segments"]["ours"]) for s in doc["streams"])
    for i in range(n_seg):
        seg.add_column(f"part {i + 1}", justify="right")
    seg.add_column("seconds", justify="right")
    for s in doc["streams"]:
        run = s["runs"][0]
        for learner, parts in run["segments"].items():
            cells = [f"{p['accuracy']:.3f}" for p in parts] + [""] * (n_seg - len(parts))
            seg.add_row(f"{s['name']} / {learner}", *cells, f"{run['seconds'][learner]:.1f}")
        seg.add_section()
    console.print(seg)
    for s in doc["streams"]:
        console.print(f"[dim]{s['name']}: {s['description']}[/]")
    ours = cfg["ours"]
    console.print(
        f"ours: MLP {ours['hidden']} on streams, the schema's default spec on data sets, "
        f"N={ours['batch']}, TrainerConfig"
        f"({', '.join(f'{k}={v}' for k, v in ours['trainer'].items())}); warm start "
        f"{ours['warm_start']}"
    )
    for s in doc["streams"]:
        if s["kind"] == "dataset":
            spec = s["ours_spec"]
            console.print(
                f"[dim]{s['name']} ({s['package']}, {s['order']}"
                f"{', drift: ' + s['drift'] if s['drift'] else ''}): ours {spec['family']} "
                f"{spec['hidden']}, embedding {spec['embedding_dim']}, inputs "
                f"{', '.join(spec['inputs'])}[/]"
            )
    s = doc["summary"]
    console.print(
        f"targets met on {s['streams_passed']}/{len(doc['streams'])} streams; "
        f"{s['runtime_s']:.0f}s in all"
    )
    console.print(machine_line(m, doc["date"]))


def main(
    samples: int | None = typer.Option(
        None,
        "--samples",
        min=200,
        max=10_000_000,
        help="Examples per stream, warm-up included (default 20000; a data set: all its rows).",
    ),
    warmup: int = typer.Option(
        1000,
        "--warmup",
        min=1,
        help="First examples every learner may learn from, uncounted (a data set: at most "
        "a fifth of its rows).",
    ),
    seed: int = typer.Option(7, help="Stream and model seed (tuning used seeds 1-3)."),
    seeds: int = typer.Option(
        1, "--seeds", min=1, max=20, help="Repeat with seeds seed..seed+K-1 and average."
    ),
    streams: str | None = typer.Option(
        None,
        "--streams",
        help="Comma-separated subset of " + ", ".join(STREAMS) + " (default: all of them, "
        "or none when --datasets is given).",
    ),
    datasets: str = typer.Option(
        "",
        "--datasets",
        help="Comma-separated real data sets shipped offline (flywheel.demo.DATASETS), or "
        "'all'; each seed streams them in another order.",
    ),
    keep_order: bool = typer.Option(
        False, "--keep-order", help="Data sets in their fixed order for every seed."
    ),
    drift_at: float | None = typer.Option(
        None,
        "--drift-at",
        min=0.0,
        max=1.0,
        help="Apply each data set's stated drift after this fraction of its rows.",
    ),
    baselines: str = typer.Option(
        ",".join(BASELINES), "--baselines", help="Comma-separated river learners to run."
    ),
    hidden: str | None = typer.Option(
        None, help="Hidden layer widths of our MLP (default 32,32; a data set: the spec's)."
    ),
    batch: int = typer.Option(100, "--batch", min=1, help="N: new examples per update."),
    lr: float | None = typer.Option(None, help="TrainerConfig.lr (default 0.001)."),
    steps: int | None = typer.Option(None, help="TrainerConfig.steps (default 16)."),
    replay: float | None = typer.Option(None, help="TrainerConfig.replay (default 0)."),
    elastic: bool = typer.Option(True, "--elastic/--fixed-lr", help="TrainerConfig.elastic."),
    linear_head: bool = typer.Option(
        True,
        "--linear-head/--no-linear-head",
        help="--datasets: ours with the logistic head beside the MLP (a Blend, "
        "`flywheel init`'s default), or the MLP alone (`--model mlp`).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Prequential accuracy on river's SEA, Hyperplane and Agrawal, or on real data sets
    (--datasets): ours vs river's."""
    from bench._streams import (
        config_dict,
        make_dataset_stream,
        make_stream,
        one_thread,
        progress,
        run_ours,
    )
    from bench._streams import trainer_config as make_config
    from bench.harness import machine
    from flywheel.demo import DATASETS

    picked = [d.strip() for d in datasets.split(",") if d.strip()]
    if picked == ["all"]:
        picked = list(DATASETS)
    if streams is None:
        streams = "" if picked else ",".join(STREAMS)
    names = [s.strip() for s in streams.split(",") if s.strip()]
    bases = [b.strip() for b in baselines.split(",") if b.strip()]
    bad = [s for s in names if s not in STREAMS] + [b for b in bases if b not in BASELINES]
    if bad or not (names or picked):
        raise typer.BadParameter(f"unknown stream or baseline: {', '.join(bad) or '(none)'}")
    unknown = [d for d in picked if d not in DATASETS]
    if unknown:
        raise typer.BadParameter(
            f"unknown data set {', '.join(unknown)}; choose from {', '.join(sorted(DATASETS))}"
        )
    if drift_at is not None and not 0 < drift_at < 1:
        raise typer.BadParameter("--drift-at must be strictly between 0 and 1")
    stream_samples = samples or 20_000
    if names and warmup >= stream_samples:
        raise typer.BadParameter("--warmup must be below --samples")
    setup = OurSetup(hidden=parse_ints(hidden or "32,32"), batch=batch)
    config = make_config(lr=lr, steps=steps, replay=replay, elastic=elastic)
    started = time.perf_counter()
    seed_list = [seed + k for k in range(seeds)]
    learners = ["ours", *bases]
    results: list[dict[str, Any]] = []
    interactive = sys.stderr.isatty()
    jobs = [("stream", n) for n in names] + [("dataset", d) for d in picked]
    with one_thread(), progress(interactive) as bar:
        info = machine()
        for kind, name in jobs:
            runs = []
            for sd in seed_list:
                if kind == "stream":
                    stream, w = make_stream(name, stream_samples, sd), warmup
                else:
                    rows = min(samples or DATASETS[name].rows, DATASETS[name].rows)
                    w = dataset_warmup(rows, warmup)
                    stream = make_dataset_stream(
                        name,
                        sd,
                        w,
                        samples=samples,
                        shuffle=not keep_order,
                        drift_at=drift_at,
                        hidden=parse_ints(hidden) if hidden is not None else None,
                        linear_head=linear_head,
                    )
                n = len(stream)
                run: dict[str, Any] = {"seed": sd, "accuracy": {}, "seconds": {}, "segments": {}}
                for learner in learners:
                    task = bar.add_task(f"{name} seed {sd}: {learner}", total=n)
                    t = time.perf_counter()
                    if learner == "ours":
                        correct = run_ours(
                            stream.x,
                            stream.y,
                            stream.n_labels,
                            config,
                            setup,
                            w,
                            sd,
                            lambda end, *_, t=task: bar.update(t, completed=end),
                            spec=stream.spec,
                        )
                    else:
                        correct = run_river(
                            learner, stream, w, sd, lambda k, t=task: bar.advance(t, k)
                        )
                    bar.update(task, completed=n)
                    run["seconds"][learner] = time.perf_counter() - t
                    run["accuracy"][learner] = float(correct.mean())
                    run["segments"][learner] = segments(correct, stream, w)
                    if not interactive:  # no progress bar: one line per learner
                        print(
                            f"{name} seed {sd} {learner}: accuracy "
                            f"{run['accuracy'][learner]:.4f} in "
                            f"{run['seconds'][learner]:.1f}s",
                            file=sys.stderr,
                        )
                runs.append(run)
            acc = {k: float(np.mean([r["accuracy"][k] for r in runs])) for k in learners}
            targets = judge(acc)
            results.append(
                {
                    "name": name,
                    "kind": kind,
                    "description": stream.description,
                    "samples": n,
                    "warmup": w,
                    "measured": n - w,
                    "drifts": stream.drifts,
                    **stream.facts,
                    "accuracy": acc,
                    "targets": targets,
                    "pass": all(t["pass"] for t in targets.values()) if targets else None,
                    "runs": runs,
                }
            )
    runtime = time.perf_counter() - started
    doc = document(
        "prequential",
        info,
        {
            "config": {
                "samples": stream_samples if names else samples,
                "warmup": warmup,
                "seeds": seed_list,
                "datasets": {
                    "order": "the data set's fixed order"
                    if keep_order
                    else "a permutation of its rows per seed",
                    "drift_at": drift_at,
                    "warmup": "min(--warmup, rows // 5)",
                },
                "ours": {
                    "hidden": list(setup.hidden),
                    "batch": setup.batch,
                    "trainer": config_dict(config),
                    "warm_start": f"input scaling fit + {setup.warm_epochs} epochs Adam "
                    f"lr {setup.warm_lr:g} batch {setup.warm_batch} on the "
                    f"warm-up, which also seeds the replay pool",
                    "protocol": "per batch of N: predict (test), observe_errors, "
                    "observe_inputs, update (train)",
                    "datasets": "default_spec(schema inferred from the warm-up rows)"
                    + (" with linear_head (a Blend)" if linear_head else "")
                    + " over schema.encode_table(rows)",
                    "linear_head": linear_head,
                },
                "baselines": {
                    "logreg": "StandardScaler() | LogisticRegression(); on data sets "
                    "numeric columns | StandardScaler() + categorical columns | "
                    "OneHotEncoder(), OneVsRestClassifier for > 2 classes",
                    "hat": "HoeffdingAdaptiveTreeClassifier(seed=seed)",
                    "arf": "ARFClassifier(seed=seed)",
                    "protocol": "learn_one on the warm-up, then predict_one, learn_one",
                },
            },
            "streams": results,
            "summary": {
                "streams_passed": sum(bool(r["pass"]) for r in results),
                "all_pass": all(bool(r["pass"]) for r in results) if bases else None,
                "runtime_s": runtime,
            },
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
