"""`python -m bench quant`: latency and accuracy of int8 (and bf16) versus fp32 serving.

Each model is trained once on the demo's seed concept (`flywheel.streams.seed_concept`,
8 features, 3 classes), then served the way the service serves it:
`ServedModel.prepare(..., precision)` and `ServedModel.predict` (what one forward pass of a
request or of a dynamic batch calls). For every precision and batch size the benchmark
times blocks of calls, precisions interleaved block by block so drift on a shared machine
hits all alike, and reports the median time per call; accuracy is measured on held-out
rows of the same concept (`precision_accuracies`, the number the gate reports as
`gate_quant_accuracy_delta`). Models:

* `demo`: the service's seed MLP (8 -> 64 -> 64 -> 3);
* `wide`: 8 -> 1024 -> 1024 -> 3, where the matrix products dominate.

torch runs on one thread (as a server pinned to one core does).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import typer

from bench.harness import document, load_range

MODELS = {"demo": [64, 64], "wide": [1024, 1024]}
PRECISIONS = ("fp32", "int8", "bf16")
BATCHES = (1, 16, 64, 256)


def make_data(n_train: int, n_test: int, seed: int) -> tuple[Any, Any, Any, Any]:
    import numpy as np

    from flywheel.streams import LABELS, seed_concept

    x, names = seed_concept(seed).sample(n_train + n_test, seed)
    y = np.asarray([LABELS.index(n) for n in names], dtype=np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def time_calls(fns: dict[str, Any], x: Any, blocks: int, min_block_s: float) -> dict[str, float]:
    """Median seconds per call of each fn; blocks interleave the fns."""
    calls = 1
    for fn in fns.values():  # warm up, and size a block to about min_block_s
        fn(x)
        t = time.perf_counter()
        fn(x)
        calls = max(calls, int(min_block_s / max(time.perf_counter() - t, 1e-7)))
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn(x)
            per[name].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in per.items()}


def main(
    models: str = typer.Option(",".join(MODELS), help="Comma-separated: demo, wide."),
    precisions: str = typer.Option(",".join(PRECISIONS), help="Comma-separated precisions."),
    batches: str = typer.Option(",".join(map(str, BATCHES)), help="Rows per call."),
    train: int = typer.Option(8000, min=100, help="Training rows."),
    test: int = typer.Option(4000, min=100, help="Held-out rows for accuracy."),
    epochs: int = typer.Option(30, min=1, help="Training epochs per model."),
    blocks: int = typer.Option(9, min=1, max=1000, help="Timed blocks per precision."),
    block_s: float = typer.Option(0.05, min=0.001, help="Seconds per timed block (about)."),
    seed: int = typer.Option(7, help="Data and model seed."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """int8 / bf16 vs fp32 serving: time per forward pass and held-out accuracy."""
    import numpy as np

    from bench._streams import one_thread, parse_ints
    from bench.harness import machine
    from flywheel.kernels.cascade import train_mlp
    from flywheel.kernels.quantize import precision_accuracies
    from flywheel.learner import default_spec
    from flywheel.modelspec import ModelSpec
    from flywheel.service.model_holder import ServedModel

    names = [m.strip() for m in models.split(",") if m.strip()]
    precs = [p.strip() for p in precisions.split(",") if p.strip()]
    if any(n not in MODELS for n in names) or any(p not in PRECISIONS for p in precs):
        raise typer.BadParameter(f"models among {list(MODELS)}, precisions among {PRECISIONS}")
    if "fp32" not in precs:
        precs.insert(0, "fp32")
    sizes = parse_ints(batches)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with one_thread():
        info = machine()
        x_tr, y_tr, x_te, y_te = make_data(train, test, seed)
        for name in names:
            base = default_spec()
            spec = ModelSpec(input_dim=base.input_dim, hidden=MODELS[name], labels=base.labels)
            module = train_mlp(spec, x_tr, y_tr, epochs=epochs, seed=seed)
            served = {p: ServedModel.prepare("bench", "1", spec, module, p) for p in precs}
            acc = {p: precision_accuracies(module, x_te, y_te, p)[1] for p in precs}
            rng = np.random.default_rng(seed)
            timing: dict[str, dict[str, float]] = {p: {} for p in precs}
            for b in sizes:
                x = x_te[rng.integers(0, len(x_te), b)]
                t = time_calls({p: served[p].predict for p in precs}, x, blocks, block_s)
                for p in precs:
                    timing[p][str(b)] = t[p] * 1e6
            row = {
                "model": name,
                "hidden": MODELS[name],
                "accuracy": acc,
                "accuracy_delta": {p: acc[p] - acc["fp32"] for p in precs},
                "us_per_call": timing,
                "speedup": {
                    p: {b: timing["fp32"][b] / timing[p][b] for b in timing[p]} for p in precs
                },
            }
            results.append(row)
            print(
                f"{name}: accuracy " + ", ".join(f"{p} {acc[p]:.4f}" for p in precs),
                file=sys.stderr,
            )
    doc = document(
        "quant",
        info,
        {
            "seconds": time.perf_counter() - started,
            "config": {
                "models": {n: MODELS[n] for n in names},
                "precisions": precs,
                "batches": list(sizes),
                "train": train,
                "test": test,
                "epochs": epochs,
                "blocks": blocks,
                "block_s": block_s,
                "seed": seed,
                "timed": "ServedModel.predict (torch.inference_mode forward + softmax), "
                "median of interleaved blocks, torch on 1 thread",
                "int8": "torch.ao.quantization.quantize_dynamic on nn.Linear, per-channel "
                "int8 weights, activations quantized per batch",
                "bf16": "nn.Linear weights and matmul in bfloat16, float32 in between",
            },
            "results": results,
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 120)
    for r in results:
        table = Table(
            title=f"{r['model']} (MLP 8-{'-'.join(map(str, r['hidden']))}-3): "
            "microseconds per ServedModel.predict call, held-out accuracy"
        )
        table.add_column("precision")
        for b in sizes:
            table.add_column(f"batch {b}", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("vs fp32", justify="right")
        for p in precs:
            cells = [
                f"{r['us_per_call'][p][str(b)]:.0f}"
                + ("" if p == "fp32" else f" ({r['speedup'][p][str(b)]:.2f}x)")
                for b in sizes
            ]
            table.add_row(
                p, *cells, f"{r['accuracy'][p]:.4f}", f"{100 * r['accuracy_delta'][p]:+.2f} pt"
            )
        console.print(table)
    m = doc["machine"]
    console.print(
        f"[dim](x) = fp32 time / this time. {m['cpu_count']} CPUs ({m['cpu_model']}), "
        f"torch {m['torch']} (1 thread), load average {load_range(m)}, "
        f"{doc['date']}, {doc['seconds']:.0f} s[/]"
    )
