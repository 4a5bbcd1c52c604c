"""`python -m bench privacy`: the cost of privacy, and what a DP update costs in time.

Accuracy. Each scenario starts from a model fitted on public data (the platform's seed
data: for the demo, the seed concept; for the bundled data set, a public 10 % slice),
then streams private examples through our learner in updates of N, every example from
its own source and used in exactly one update, as production does with DP on. The same
stream runs with DP-SGD (ε = 3, δ = 1e-5 per source: σ calibrated by the Opacus RDP
accountant for q = 0.5 over one update's steps) and without; each arm gets its best
learning rate from a small grid (mean over seeds), and is scored on a held-out set of
the stream's concept after every update. Gap = non-private minus DP accuracy, averaged
over the last 5 updates. Target <= 2 points (Opacus's MNIST example: 2.2 at ε = 2.9).

With `--defaults` (bench/_dp_defaults.py): the product's own defaults instead, drift
response on, DP against non-private on the same drift streams in the same order,
prequential accuracy (target: mean gap <= 5 points, none above 10), for each mechanism
(DP-SGD and DP-FTRL, FLYWHEEL_PRIVACY_MECHANISM) side by side at the same ε.

Throughput. Samples/s of one training step on the demo MLP at batch 256: non-private
Adam, our DP update (engine fused and opacus: clipping + noise + Adam), and Opacus ghost
clipping (`make_private(..., grad_sample_mode="ghost")`), the baseline the kernels beat.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import typer

SCENARIOS = ("demo", "shuttle")
GAP_TARGET = 2.0
LRS = (0.003, 0.01, 0.02, 0.03)  # the same grid for both arms; each takes its best
DP_LRS = PLAIN_LRS = LRS
TAIL = 5


def _labels(values: list[Any]) -> tuple[np.ndarray, int]:
    classes = sorted(set(values), key=str)
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[v] for v in values], np.int64), len(classes)


def scenario(name: str, samples: int, seed: int) -> dict[str, Any]:
    """(public x, y), private stream (x, y), held-out (x, y) and the number of labels."""
    if name == "demo":
        from flywheel.streams import LABELS, drift_concept, seed_concept

        def draw(concept: Any, k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
            x, names = concept.sample(k, sample_seed=s)
            return x.astype(np.float32), np.asarray([LABELS.index(v) for v in names])

        return {
            "public": draw(seed_concept(7), 2400, seed),
            "stream": draw(drift_concept(7), samples, seed + 1),
            "holdout": draw(drift_concept(7), 1000, seed + 2),
            "labels": len(LABELS),
            "description": "seed concept (public) -> drift concept (private), "
            "8 features, 3 classes",
        }
    if name == "shuttle":
        from river.datasets import Shuttle

        rows = list(Shuttle().take(samples + 4000))
        rng = np.random.default_rng(seed)
        rng.shuffle(rows)
        x = np.asarray([[r[0][k] for k in sorted(r[0])] for r in rows], np.float32)
        y, k = _labels([r[1] for r in rows])
        pub, hold = 2000, 2000
        return {
            "public": (x[:pub], y[:pub]),
            "holdout": (x[pub : pub + hold], y[pub : pub + hold]),
            "stream": (x[pub + hold :], y[pub + hold :]),
            "labels": k,
            "description": "river Shuttle (bundled, 9 features, 7 classes): 2000 public, "
            f"{samples} private, 2000 held out",
        }
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def run_arm(
    sc: dict[str, Any],
    *,
    dp: bool,
    lr: float,
    batch: int,
    seed: int,
    epsilon: float,
    delta: float,
    engine: str,
) -> list[float]:
    """Held-out accuracy after every update of one pass over the private stream."""
    from bench._streams import OurSetup, warm_model
    from flywheel.learner.trainer import OnlineTrainer, TrainerConfig
    from flywheel.privacy import DPConfig
    from flywheel.settings import PrivacySettings

    (xp, yp), (xs, ys), (xh, yh) = sc["public"], sc["stream"], sc["holdout"]
    module = warm_model(xp, yp, sc["labels"], OurSetup(hidden=(64, 64), warm_epochs=20), seed)
    config = TrainerConfig(lr=lr, steps=8, replay=2.0, elastic=False)
    trainer = OnlineTrainer(module, config, input_dim=xp.shape[1], seed=seed)
    trainer.remember(xp, yp)
    trainer.remember_public(xp, yp)
    privacy = PrivacySettings(
        privacy_epsilon=epsilon, privacy_delta=delta, privacy_source_updates=1
    )
    mechanism = DPConfig.from_settings(privacy).mechanism(config.steps)
    held = []
    for start in range(0, len(ys), batch):
        x, y = xs[start : start + batch], ys[start : start + batch]
        if dp:
            trainer.update_private(
                x,
                y,
                np.ones(len(y), np.float32),
                np.arange(len(y)),
                mechanism,
                max_grad_norm=1.0,
                engine=engine,
            )
        else:
            trainer.update(x, y)
        held.append(float((trainer.predict(xh) == yh).mean()))
    return held


def throughput(engine_names: list[str], batch: int = 256, steps: int = 30) -> dict[str, float]:
    """Samples/s of one training step on the demo MLP, each way, same data."""
    import warnings

    import torch
    from torch import nn

    from flywheel.learner.seed_model import default_spec
    from flywheel.modelspec import build_model
    from flywheel.privacy import PrivateBatch, dp_update

    spec = default_spec()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.input_dim, generator=gen)
    y = torch.randint(0, len(spec.labels), (batch,), generator=gen)

    def timed(step: Any) -> float:
        step()  # warm up
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return batch * steps / (time.perf_counter() - t)

    out: dict[str, float] = {}
    module = build_model(spec)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def plain() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()

    out["non-private"] = timed(plain)
    pb = PrivateBatch(
        x.numpy(), y.numpy(), np.ones(batch, np.float32), np.arange(batch), np.zeros(batch, bool)
    )
    for engine in engine_names:
        module = build_model(spec)
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        out[f"ours ({engine})"] = timed(
            lambda m=module, o=opt, e=engine: dp_update(
                m,
                o,
                pb,
                steps=1,
                sample_rate=1.0,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                generator=gen,
                engine=e,
            )
        )
    from opacus import PrivacyEngine

    module = build_model(spec)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, crit, _ = PrivacyEngine().make_private(
            module=module,
            optimizer=opt,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
            poisson_sampling=False,
        )

    def ghost() -> None:
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    out["opacus ghost"] = timed(ghost)
    return out


def main(
    samples: int = typer.Option(
        20_000, "--samples", min=500, max=40_000, help="Private examples streamed per scenario."
    ),
    batch: int = typer.Option(1000, "--batch", min=10, help="N: examples per update."),
    seeds: int = typer.Option(2, "--seeds", min=1, max=10, help="Seeds 1..K, averaged."),
    scenarios: str = typer.Option(
        ",".join(SCENARIOS), "--scenarios", help="Comma-separated subset of " + ", ".join(SCENARIOS)
    ),
    epsilon: float = typer.Option(3.0, min=0.01, help="ε per source (each in one update)."),
    delta: float = typer.Option(1e-5, min=1e-12, max=0.1),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
    defaults: bool = typer.Option(
        False,
        "--defaults",
        help="The product's defaults (batch 100, drift response on) on drift streams, "
        "prequential; --samples is per stream (try 4000), --scenarios names streams.",
    ),
    warmup: int = typer.Option(
        500, "--warmup", min=50, help="--defaults: first rows, the public trusted set."
    ),
    dp_background: bool = typer.Option(
        True,
        "--dp-background/--no-dp-background",
        help="--defaults: the DP-SGD arm's background line (the product's default: on).",
    ),
) -> None:
    """Accuracy with DP (ε=3) next to the same learner without DP; DP update throughput."""
    from rich.console import Console
    from rich.table import Table

    from bench._streams import one_thread, progress
    from bench.harness import document, machine
    from flywheel.privacy import DPConfig
    from flywheel.settings import PrivacySettings

    if defaults:
        run_product_defaults(
            scenarios, samples, warmup, seeds, epsilon, delta, json_out, dp_background
        )
        return

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    if not names or any(n not in SCENARIOS for n in names):
        raise typer.BadParameter(f"--scenarios must be a subset of {', '.join(SCENARIOS)}")
    privacy = PrivacySettings(
        privacy_epsilon=epsilon, privacy_delta=delta, privacy_source_updates=1
    )
    sigma = DPConfig.from_settings(privacy).mechanism(8)
    results = []
    interactive = sys.stderr.isatty()
    with one_thread(), progress(interactive) as bar:
        info = machine()
        for name in names:
            arms: dict[str, dict[float, list[list[float]]]] = {"dp": {}, "plain": {}}
            task = bar.add_task(name, total=seeds * (len(DP_LRS) + len(PLAIN_LRS)))
            for seed in range(1, seeds + 1):
                sc = scenario(name, samples, seed)
                for dp, lrs in ((True, DP_LRS), (False, PLAIN_LRS)):
                    for lr in lrs:
                        arms["dp" if dp else "plain"].setdefault(lr, []).append(
                            run_arm(
                                sc,
                                dp=dp,
                                lr=lr,
                                batch=batch,
                                seed=seed,
                                epsilon=epsilon,
                                delta=delta,
                                engine="auto",
                            )
                        )
                        bar.advance(task)
            best = {}
            for arm, by_lr in arms.items():
                scores = {
                    lr: float(np.mean([np.mean(h[-TAIL:]) for h in runs]))
                    for lr, runs in by_lr.items()
                }
                lr = max(scores, key=scores.get)  # type: ignore[arg-type]
                best[arm] = {"lr": lr, "accuracy": scores[lr], "by_lr": scores}
            gap = 100 * (best["plain"]["accuracy"] - best["dp"]["accuracy"])
            results.append(
                {
                    "scenario": name,
                    "description": sc["description"],
                    "dp": best["dp"],
                    "non_private": best["plain"],
                    "gap_points": gap,
                    "pass": gap <= GAP_TARGET,
                }
            )
        speed = throughput(["fused", "opacus"])
    doc = document(
        "privacy",
        info,
        {
            "samples": samples,
            "batch": batch,
            "seeds": seeds,
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": sigma.noise_multiplier,
            "sample_rate": 0.5,
            "steps_per_update": 8,
            "scenarios": results,
            "throughput_samples_per_s": speed,
            "fused_vs_ghost": speed["ours (fused)"] / speed["opacus ghost"],
            "fused_vs_non_private": speed["ours (fused)"] / speed["non-private"],
        },
        command=False,
    )
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    console = Console()
    table = Table(
        title=f"privacy: accuracy at ε={epsilon:g} (σ={sigma.noise_multiplier:.2f}) "
        f"vs without DP, N={batch}, {seeds} seed(s)"
    )
    for col in ("scenario", "DP (lr)", "non-private (lr)", "gap (points)", "target <= 2"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r["scenario"],
            f"{r['dp']['accuracy']:.3f} ({r['dp']['lr']:g})",
            f"{r['non_private']['accuracy']:.3f} ({r['non_private']['lr']:g})",
            f"{r['gap_points']:.2f}",
            "pass" if r["pass"] else "MISS",
        )
    console.print(table)
    speed_table = Table(title="DP update throughput, demo MLP, batch 256 (samples/s)")
    speed_table.add_column("method")
    speed_table.add_column("samples/s", justify="right")
    speed_table.add_column("vs non-private", justify="right")
    for k, v in speed.items():
        speed_table.add_row(k, f"{v:,.0f}", f"{v / speed['non-private']:.2f}x")
    console.print(speed_table)


def run_product_defaults(
    scenarios: str,
    samples: int,
    warmup: int,
    seeds: int,
    epsilon: float,
    delta: float,
    json_out: bool,
    dp_background: bool = True,
) -> None:
    """`--defaults`: every stream of `bench._dp_defaults` unless `scenarios` names some."""
    from rich.console import Console
    from rich.table import Table

    from bench._dp_defaults import MECHANISMS, STREAMS, run_defaults, verdict
    from bench._streams import one_thread
    from bench.harness import document, machine

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    if names == list(SCENARIOS):  # the option's default: the accuracy bench's scenarios
        names = list(STREAMS)
    if not names or any(n not in STREAMS for n in names):
        raise typer.BadParameter(f"with --defaults, --scenarios is a subset of {STREAMS}")
    if warmup * 2 > samples:
        raise typer.BadParameter("--warmup must be at most half of --samples")
    with one_thread():
        info = machine()
        results = run_defaults(
            names, samples, warmup, seeds, epsilon, delta, dp_background=dp_background
        )
    doc = document(
        "privacy-defaults",
        info,
        {
            "samples": samples,
            "warmup": warmup,
            "seeds": seeds,
            "epsilon": epsilon,
            "delta": delta,
            "dp_background": dp_background,
            "streams": results,
            "default_mechanism": results[0]["mechanism"],
            **verdict(results),
            "by_mechanism": {m: verdict(results, m) for m in MECHANISMS},
        },
        command=False,
    )
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    table = Table(
        title=f"privacy --defaults: prequential accuracy, DP (ε={epsilon:g}, δ={delta:g}) "
        f"vs without DP, {samples} rows ({warmup} public warm-up), {seeds} seed(s)"
    )
    table.add_column("stream")
    table.add_column("non-private")
    for m in MECHANISMS:
        for col in ("", " gap", " ε spent"):
            table.add_column(m.upper() + col)
    for r in results:
        cells = [r["stream"], f"{r['non_private']:.3f}"]
        for m in MECHANISMS:
            arm = r["mechanisms"][m]
            cells += [f"{arm['dp']:.3f}", f"{arm['gap_points']:.2f}", f"{arm['epsilon_spent']:.2f}"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    for m, v in doc["by_mechanism"].items():
        default = " (default)" if m == doc["default_mechanism"] else ""
        console.print(
            f"{m}{default}: mean gap {v['mean_gap_points']:.2f}, worst "
            f"{v['worst_gap_points']:.2f} (target {v['target']}): {v['pass']}"
        )
