"""`python -m bench dpclip`: DP-SGD training throughput, fused clipping vs Opacus.

Samples per second of full training steps on the same fixed batches, every method on a
fresh copy of the same initial model, in one process, side by side:

* ours: `flywheel.kernels.clip_and_accumulate` (one forward, one backward: by hand for
  these Sequential MLPs, see kernels/mlp_backward.py; clipped sum) + Gaussian noise
  N(0, (σC)²) per parameter + division by the batch size B + SGD step. The grads are
  views of one flat buffer: one `normal_` draws N(0, (σC/B)²) for every parameter into
  it, and the kernel adds Σ_i clip(∇ℓ_i)/B on top (weights 1/B, accumulate=True);
* Opacus ghost clipping: `make_private(..., criterion=..., grad_sample_mode="ghost")`
  (its criterion runs two backwards), `optimizer.step()` (noise, accounting hook);
* Opacus hooks: `make_private(..., grad_sample_mode="hooks")`, per-sample gradients
  materialised by hooks, `optimizer.step()`;
* non-private: plain mean cross-entropy, backward, SGD step;
* ours without the noise (a breakdown, no target): ours minus the Gaussian draw, to show
  what the clipping itself costs next to non-private SGD;
* ours, autograd backward (a breakdown, no target): ours with `backward="autograd"`,
  the kernel's path for modules the hand-written backward does not know.

Each method runs for `--seconds` per round after `--warmup` untimed steps; rounds are
interleaved (the method order rotates every round) so drift on a shared machine hits
every method alike; figures are medians over rounds, by wall clock and per CPU-second.
torch runs on `--threads` (default 1) for every method. Targets (issue 7): ours ≥ 0.8 ×
non-private and ≥ 1.7 × Opacus ghost.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import typer

from bench.harness import document, load_range

METHODS = ("ours", "ghost", "hooks", "nonprivate", "ours_nonoise", "ours_autograd")
LABELS = {
    "ours": "ours (fused BK clipping)",
    "ghost": "Opacus ghost",
    "hooks": "Opacus hooks",
    "nonprivate": "non-private SGD",
    "ours_nonoise": "ours without the noise",
    "ours_autograd": "ours, autograd backward",
}
MODELS = ("demo", "wide")
TARGET_VS_NONPRIVATE = 0.8
TARGET_VS_GHOST = 1.7
POOL_BATCHES = 8  # distinct batches cycled through (the data never changes the cost)


def model_dims(name: str) -> tuple[int, list[int], int]:
    """(input_dim, hidden, classes): the demo MLP of learner/seed_model, or a wider one."""
    if name == "demo":
        from flywheel.learner.seed_model import default_spec

        spec = default_spec()
        return spec.input_dim, list(spec.hidden), len(spec.labels)
    if name == "wide":
        return 64, [256, 256], 10
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_step(
    method: str,
    name: str,
    batch: int,
    clip: float,
    sigma: float,
    lr: float,
    seed: int,
    pool: list[tuple[Any, Any]],
) -> Callable[[Any, Any], None]:
    """A closure doing one training step of `method` on (x, y), on its own fresh model."""
    import warnings

    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from flywheel.modelspec import ModelSpec, build_model

    dim, hidden, classes = model_dims(name)
    torch.manual_seed(seed)
    module = build_model(
        ModelSpec(input_dim=dim, hidden=hidden, labels=[f"c{i}" for i in range(classes)])
    )
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)

    if method == "nonprivate":

        def step(x: Any, y: Any) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            optimizer.step()

        return step

    if method in ("ours", "ours_nonoise", "ours_autograd"):
        from flywheel.kernels import clip_and_accumulate

        backward = "autograd" if method == "ours_autograd" else "auto"
        params = [p for p in module.parameters() if p.requires_grad]
        sizes = [p.numel() for p in params]
        # The grads live in one flat buffer: the noise N(0, (σC)²)/B for every parameter
        # is one draw straight into it, and the kernel adds Σ_i clip(∇ℓ_i)/B on top
        # (weights 1/B, accumulate=True): no other pass over the parameters.
        flat = torch.zeros(sum(sizes))
        for p, v in zip(params, flat.split(sizes), strict=True):
            p.grad = v.view_as(p)
        inv = torch.full((batch,), 1.0 / batch)
        std = sigma * clip / batch

        def step(x: Any, y: Any) -> None:
            flat.normal_(0.0, std)
            clip_and_accumulate(module, x, y, clip, weights=inv, accumulate=True, backward=backward)
            optimizer.step()

        def step_nonoise(x: Any, y: Any) -> None:
            clip_and_accumulate(module, x, y, clip, weights=inv)
            optimizer.step()

        return step_nonoise if method == "ours_nonoise" else step

    from opacus import PrivacyEngine

    xs = torch.cat([x for x, _ in pool])
    ys = torch.cat([y for _, y in pool])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off" and similar notices
        engine = PrivacyEngine()
        if method == "ghost":
            gsm, dp_opt, criterion, _ = engine.make_private(
                module=module,
                optimizer=optimizer,
                criterion=nn.CrossEntropyLoss(),
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=clip,
                poisson_sampling=False,
                grad_sample_mode="ghost",
            )

            def step(x: Any, y: Any) -> None:
                dp_opt.zero_grad(set_to_none=True)
                criterion(gsm(x), y).backward()
                dp_opt.step()

            return step
        if method == "hooks":
            gsm, dp_opt, _ = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=clip,
                poisson_sampling=False,
                grad_sample_mode="hooks",
            )

            def step(x: Any, y: Any) -> None:
                dp_opt.zero_grad(set_to_none=True)
                F.cross_entropy(gsm(x), y).backward()
                dp_opt.step()

            return step
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def timed(
    step: Callable[[Any, Any], None],
    pool: list[tuple[Any, Any]],
    seconds: float,
    warmup: int,
    min_steps: int,
) -> dict[str, float]:
    """Untimed warm-up steps, then steps until `seconds` have passed (at least min_steps)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' full-backward-hook notice on layer 1
        for i in range(warmup):
            step(*pool[i % len(pool)])
        steps = 0
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            step(*pool[steps % len(pool)])
            steps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and steps >= min_steps:
                break
        cpu = time.process_time() - c0
    batch = len(pool[0][1])
    return {
        "steps": steps,
        "seconds": elapsed,
        "samples_per_s": steps * batch / elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "cpu_seconds": cpu,
        "samples_per_cpu_s": steps * batch / cpu if cpu > 0 else float("nan"),
    }


def judge(rate: dict[str, float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if "ours" not in rate:
        return out
    for base, target in (("nonprivate", TARGET_VS_NONPRIVATE), ("ghost", TARGET_VS_GHOST)):
        if base in rate:
            ratio = rate["ours"] / rate[base]
            out[f"vs_{base}"] = {
                "target": f"ours / {base} >= {target:g}",
                "ratio": ratio,
                "pass": ratio >= target,
            }
    for base in ("hooks", "ours_nonoise", "ours_autograd"):
        if base in rate:
            out[f"vs_{base}"] = {"target": None, "ratio": rate["ours"] / rate[base], "pass": None}
    return out


def machine_info(threads: int) -> dict[str, Any]:
    """The learner benchmarks' machine facts, with this run's threads and opacus."""
    from importlib import metadata

    from bench.harness import machine

    return {**machine(), "torch_threads": threads, "opacus": metadata.version("opacus")}


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 120)
    cfg, m = doc["config"], doc["machine"]
    for model in doc["models"]:
        table = Table(
            title=f"DP-SGD training throughput, {model['name']} MLP "
            f"{model['architecture']} ({model['parameters']:,} parameters), "
            f"batch {cfg['batch']}, median of {cfg['rounds']} rounds"
        )
        for col in (
            "method",
            "samples/s",
            "ms/step",
            "rounds: min-max",
            "ours / this",
            "samples/CPU-s",
            "ours / this (CPU)",
        ):
            table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
        rate, cpu = model["samples_per_s"], model["samples_per_cpu_s"]
        for method in model["methods"]:
            runs = model["runs"][method]
            ratio = rate["ours"] / rate[method] if "ours" in rate else float("nan")
            cpu_ratio = cpu["ours"] / cpu[method] if "ours" in cpu else float("nan")
            table.add_row(
                LABELS[method],
                f"[bold]{rate[method]:,.0f}[/]",
                f"{1000 * cfg['batch'] / rate[method]:.2f}",
                f"{min(r['samples_per_s'] for r in runs):,.0f}-"
                f"{max(r['samples_per_s'] for r in runs):,.0f}",
                f"{ratio:.2f}x",
                f"{cpu[method]:,.0f}",
                f"{cpu_ratio:.2f}x",
            )
        console.print(table)
        for t, tc in zip(
            model["targets"].values(), model["targets_cpu_time"].values(), strict=True
        ):
            if t["pass"] is None:
                continue
            color = "green" if t["pass"] else "red"
            console.print(
                f"  {t['target']}: [{color}]{t['ratio']:.2f} "
                f"{'PASS' if t['pass'] else 'MISS'}[/] (CPU time: "
                f"{tc['ratio']:.2f})"
            )
    console.print(
        f"[dim]σ={cfg['noise_multiplier']}, C={cfg['max_grad_norm']}, "
        f"{cfg['seconds']} s per method per round after {cfg['warmup']} warm-up "
        f"steps; {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['torch']} "
        f"({m['torch_threads']} threads), opacus {m['opacus']}, load average "
        f"{load_range(m)}, "
        f"{doc['date']}[/]"
    )


def main(
    models: str = typer.Option(
        ",".join(MODELS),
        "--models",
        help="Comma-separated subset of "
        + ", ".join(MODELS)
        + " (demo: default_spec(), 8-64-64-3; wide: 64-256-256-10).",
    ),
    methods: str = typer.Option(
        ",".join(METHODS), "--methods", help="Comma-separated subset of " + ", ".join(METHODS) + "."
    ),
    batch: int = typer.Option(256, "--batch", min=1, help="Samples per step."),
    seconds: float = typer.Option(
        2.0, "--seconds", min=0.0, help="Timed seconds per method per round."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Interleaved rounds (median)."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed steps before each timing."),
    min_steps: int = typer.Option(3, "--min-steps", min=1, help="Timed steps at least."),
    threads: int = typer.Option(
        1, "--threads", min=1, help="torch threads, every method (1: see docs/benchmarks.md)."
    ),
    noise_multiplier: float = typer.Option(1.0, "--sigma", min=0.0, help="σ, every DP method."),
    max_grad_norm: float = typer.Option(1.0, "--clip", min=1e-9, help="C, every DP method."),
    seed: int = typer.Option(0, help="Model and data seed."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """DP-SGD samples/s: fused clipping (ours) vs Opacus ghost and hooks vs non-private."""
    import torch

    names = [s.strip() for s in models.split(",") if s.strip()]
    chosen = [s.strip() for s in methods.split(",") if s.strip()]
    bad = [n for n in names if n not in MODELS] + [c for c in chosen if c not in METHODS]
    if bad or not names or not chosen:
        raise typer.BadParameter(f"unknown model or method: {', '.join(bad) or '(none)'}")
    chosen = [m for m in METHODS if m in chosen]  # canonical order
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results = []
    try:
        info = machine_info(threads)
        for name in names:
            dim, hidden, classes = model_dims(name)
            gen = torch.Generator().manual_seed(seed)
            pool = [
                (
                    torch.randn(batch, dim, generator=gen),
                    torch.randint(0, classes, (batch,), generator=gen),
                )
                for _ in range(POOL_BATCHES)
            ]
            steps = {
                m: make_step(m, name, batch, max_grad_norm, noise_multiplier, 0.01, seed, pool)
                for m in chosen
            }
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in chosen}
            for r in range(rounds):
                order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
                for m in order:
                    runs[m].append(timed(steps[m], pool, seconds, warmup, min_steps))
                    if not json_out:
                        print(
                            f"{name} round {r + 1} {m}: "
                            f"{runs[m][-1]['samples_per_s']:,.0f} samples/s",
                            file=sys.stderr,
                        )
            rate = {m: statistics.median(x["samples_per_s"] for x in runs[m]) for m in chosen}
            cpu_rate = {
                m: statistics.median(x["samples_per_cpu_s"] for x in runs[m]) for m in chosen
            }
            targets = judge(rate)
            widths = [dim, *hidden, classes]
            results.append(
                {
                    "name": name,
                    "architecture": "-".join(map(str, widths)),
                    "parameters": sum(a * b + b for a, b in zip(widths, widths[1:], strict=False)),
                    "methods": chosen,
                    "samples_per_s": rate,
                    "samples_per_cpu_s": cpu_rate,
                    "runs": runs,
                    "targets": targets,
                    "targets_cpu_time": judge(cpu_rate),
                    "pass": all(t["pass"] for t in targets.values() if t["pass"] is not None)
                    if targets
                    else None,
                }
            )
    finally:
        torch.set_num_threads(previous)
    doc = document(
        "dpclip",
        info,
        {
            "config": {
                "batch": batch,
                "seconds": seconds,
                "rounds": rounds,
                "warmup": warmup,
                "noise_multiplier": noise_multiplier,
                "max_grad_norm": max_grad_norm,
                "seed": seed,
                "lr": 0.01,
                "optimizer": "SGD",
                "methods": {m: LABELS[m] for m in chosen},
                "opacus": "make_private(noise_multiplier=σ, max_grad_norm=C, "
                "poisson_sampling=False, loss_reduction='mean'); ghost also "
                "criterion=CrossEntropyLoss()",
            },
            "models": results,
            "summary": {
                "all_pass": all(bool(r["pass"]) for r in results) if "ours" in chosen else None,
                "runtime_s": time.perf_counter() - started,
            },
        },
    )
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
