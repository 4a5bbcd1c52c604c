"""`python -m bench cascade`: heavy-model FLOPs a calibrated cascade saves, at what accuracy.

Per task, three disjoint sets are drawn: training rows (both networks learn from them),
calibration rows (the threshold is chosen on them with
`flywheel.kernels.cascade.calibrate_threshold`: the smallest threshold at which the
cascade keeps `--target` of the heavy network's accuracy, with a margin of `--z`
standard errors, and keeps it at every higher threshold) and test rows (never seen by
either step; every reported figure is measured on them). `build_cascade` does the
training and calibration, exactly as a deployment would build one.

Reported on the test rows: heavy, light and cascade accuracy, the cascade's share of the
heavy accuracy, the share of rows the light network answers, the heavy-model FLOPs saved
(light FLOPs on every row plus heavy FLOPs on escalated rows, against heavy FLOPs on every
row) and the measured time of `Cascade.route` against the heavy network alone, batch 1
(row by row, as a lone client) and batch 256. Tasks:

* `demo`: the service's seed concept (`flywheel.streams.seed_concept`: river RandomRBF,
  12 centroids, 8 features, 3 classes);
* `rbf`: a harder RandomRBF (100 centroids, 16 features, 8 classes).

Target (issue 7): >= 50 % of heavy FLOPs saved at >= 99.5 % of heavy accuracy.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import typer

from bench.harness import document, load_range

TASKS = {"demo": (12, 8, 3), "rbf": (100, 16, 8)}  # (centroids, features, classes)
SAVED_TARGET = 0.5
ACCURACY_TARGET = 0.995


def make_task(name: str, n: int, seed: int) -> tuple[Any, Any, list[str]]:
    import numpy as np
    from river.datasets import synth

    centroids, features, classes = TASKS[name]
    gen = synth.RandomRBF(
        seed_model=seed,
        seed_sample=seed + 1000,
        n_classes=classes,
        n_features=features,
        n_centroids=centroids,
    )
    xs, ys = [], []
    for x, y in gen.take(n):
        xs.append([x[i] for i in range(features)])
        ys.append(y)
    return (
        np.asarray(xs, np.float32),
        np.asarray(ys, np.int64),
        [f"class_{i}" for i in range(classes)],
    )


def time_per_row(fn: Any, x: Any, batch: int, repeats: int) -> float:
    """Median over `repeats` passes of seconds per row, calling fn on chunks of `batch`."""
    import torch

    xt = torch.from_numpy(x)
    chunks = list(xt.split(batch))
    times = []
    with torch.inference_mode():
        for c in chunks[:4]:
            fn(c)
        for _ in range(repeats):
            t = time.perf_counter()
            for c in chunks:
                fn(c)
            times.append((time.perf_counter() - t) / len(xt))
    return statistics.median(times)


def main(
    tasks: str = typer.Option(",".join(TASKS), help="Comma-separated: demo, rbf."),
    light: str = typer.Option("64", help="Hidden widths of the light network."),
    heavy: str = typer.Option("256,256", help="Hidden widths of the heavy network."),
    target: float = typer.Option(
        ACCURACY_TARGET, min=0.5, max=1.0, help="Share of heavy accuracy the cascade must keep."
    ),
    z: float = typer.Option(2.0, min=0.0, max=5.0, help="Calibration margin (std errors)."),
    train: int = typer.Option(25_000, min=500, help="Training rows."),
    calibration: int = typer.Option(10_000, min=100, help="Calibration rows."),
    test: int = typer.Option(10_000, min=100, help="Test rows (all figures)."),
    epochs: int = typer.Option(30, min=1, help="Training epochs per network."),
    seed: int = typer.Option(7, help="Task and model seed."),
    seeds: int = typer.Option(1, min=1, max=10, help="Repeat with seeds seed..seed+K-1."),
    timing_rows: int = typer.Option(2000, min=10, help="Test rows timed row by row."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """FLOPs saved by a light/heavy cascade at >= 99.5 % of the heavy network's accuracy."""
    import torch

    from bench._streams import one_thread, parse_ints
    from bench.harness import machine
    from flywheel.kernels.cascade import build_cascade, cascade_flops

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names or any(t not in TASKS for t in names):
        raise typer.BadParameter(f"tasks must be among {', '.join(TASKS)}")
    light_h, heavy_h = list(parse_ints(light)), list(parse_ints(heavy))
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with one_thread():
        info = machine()
        for name in names:
            for sd in range(seed, seed + seeds):
                t0 = time.perf_counter()
                x, y, labels = make_task(name, train + calibration + test, sd)
                a, b = train, train + calibration
                spec, module, cal = build_cascade(
                    x[:a],
                    y[:a],
                    x[a:b],
                    y[a:b],
                    labels=labels,
                    light=light_h,
                    heavy=heavy_h,
                    target=target,
                    z=z,
                    epochs=epochs,
                    seed=sd,
                )
                x_te, y_te = x[b:], y[b:]
                with torch.inference_mode():
                    xt = torch.from_numpy(x_te)
                    logits, escalated = module.route(xt)
                    heavy_acc = float((module.heavy(xt).argmax(1).numpy() == y_te).mean())
                    light_acc = float((module.light(xt).argmax(1).numpy() == y_te).mean())
                acc = float((logits.argmax(1).numpy() == y_te).mean())
                share = 1.0 - float(escalated.float().mean())
                flops = cascade_flops(spec, share)
                xs = x_te[:timing_rows]
                t_heavy1 = time_per_row(module.heavy, xs, 1, 3)
                t_casc1 = time_per_row(module.route, xs, 1, 3)
                t_heavy256 = time_per_row(module.heavy, x_te, 256, 7)
                t_casc256 = time_per_row(module.route, x_te, 256, 7)
                ratio = acc / heavy_acc if heavy_acc else float("nan")
                run = {
                    "task": name,
                    "seed": sd,
                    "threshold": spec.threshold,
                    "calibration": cal.as_dict(),
                    "test": {
                        "n": int(len(y_te)),
                        "heavy_accuracy": heavy_acc,
                        "light_accuracy": light_acc,
                        "cascade_accuracy": acc,
                        "accuracy_ratio": ratio,
                        "light_share": share,
                    },
                    "flops_per_row": flops,
                    "time_us_per_row": {
                        "heavy_batch1": t_heavy1 * 1e6,
                        "cascade_batch1": t_casc1 * 1e6,
                        "heavy_batch256": t_heavy256 * 1e6,
                        "cascade_batch256": t_casc256 * 1e6,
                    },
                    "time_saved": {
                        "batch1": 1 - t_casc1 / t_heavy1,
                        "batch256": 1 - t_casc256 / t_heavy256,
                    },
                    "targets": {
                        "flops_saved": {
                            "target": f">= {SAVED_TARGET}",
                            "value": flops["saved"],
                            "pass": flops["saved"] >= SAVED_TARGET,
                        },
                        "accuracy_ratio": {
                            "target": f">= {ACCURACY_TARGET}",
                            "value": ratio,
                            "pass": ratio >= ACCURACY_TARGET,
                        },
                    },
                    "seconds": time.perf_counter() - t0,
                }
                runs.append(run)
                print(
                    f"{name} seed {sd}: threshold {spec.threshold:.4f}, light share "
                    f"{share:.3f}, accuracy {acc:.4f} vs heavy {heavy_acc:.4f} "
                    f"({ratio:.4f}), FLOPs saved {flops['saved']:.3f} "
                    f"({run['seconds']:.0f} s)",
                    file=sys.stderr,
                )
    doc = document(
        "cascade",
        info,
        {
            "seconds": time.perf_counter() - started,
            "config": {
                "tasks": {
                    t: dict(zip(("centroids", "features", "classes"), TASKS[t], strict=True))
                    for t in names
                },
                "light": light_h,
                "heavy": heavy_h,
                "target": target,
                "z": z,
                "train": train,
                "calibration": calibration,
                "test": test,
                "epochs": epochs,
                "seeds": list(range(seed, seed + seeds)),
                "torch_threads": 1,
            },
            "runs": runs,
            "all_pass": all(t["pass"] for r in runs for t in r["targets"].values()),
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 140)
    table = Table(
        title=f"cascade light {light_h} / heavy {heavy_h}, target {target} of heavy "
        f"accuracy (z={z}); test-set figures"
    )
    for col in (
        "task",
        "seed",
        "threshold",
        "heavy acc",
        "light acc",
        "cascade acc",
        "acc ratio",
        "light share",
        "FLOPs saved",
        "time saved b1",
        "time saved b256",
        "targets",
    ):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in runs:
        t = r["test"]
        ok = all(v["pass"] for v in r["targets"].values())
        table.add_row(
            r["task"],
            str(r["seed"]),
            f"{r['threshold']:.4f}",
            f"{t['heavy_accuracy']:.4f}",
            f"{t['light_accuracy']:.4f}",
            f"{t['cascade_accuracy']:.4f}",
            f"{t['accuracy_ratio']:.4f}",
            f"{t['light_share']:.3f}",
            f"{r['flops_per_row']['saved']:.1%}",
            f"{r['time_saved']['batch1']:.1%}",
            f"{r['time_saved']['batch256']:.1%}",
            "[green]PASS[/]" if ok else "[red]MISS[/]",
        )
    console.print(table)
    m = doc["machine"]
    console.print(
        f"[dim]FLOPs per row: light {runs[0]['flops_per_row']['light']:.0f}, heavy "
        f"{runs[0]['flops_per_row']['heavy']:.0f}. {m['cpu_count']} CPUs "
        f"({m['cpu_model']}), torch {m['torch']} (1 thread), load average "
        f"{load_range(m)}, {doc['date']}, "
        f"{doc['seconds']:.0f} s[/]"
    )
