"""`python -m bench privacy --defaults`: DP against non-private with the product's defaults.

Both arms are the learner as `learner/online.py` runs it, on the same stream in the same
order, each with every default of `LearnerSettings` and `PrivacySettings` (batch 100,
8 steps, replay 2, elastic boost and drift response on; DP ε = 3 and δ = 1e-5 per
source, σ calibrated for 2 updates per source, q = 0.5, C = 1, at most 16 examples per
source). The DP arm goes through `PrivateStep` itself: rows are `StoredExample`s,
bounded, planned by the budget planner and recorded in a real ledger (a SQLite store
migrated to head) before they train. Each arm is served on its own: it predicts each
batch before training on it (prequential accuracy), and its own mistakes feed its drift
detector, as the served model's corrections do in production.

Privacy unit: every example is a correction without a client-given source, so its
source is its prediction (`prediction:<id>`), as the product does for such a
correction: each example is its own source and may join `privacy_source_updates` (2)
updates within ε = 3. With the drift response, the second one is a reuse in the window
since a change.

The warm-up rows are the trusted set, public (as the demo's seed data is): the seed
model is fitted on them, they are the public replay, and the novelty reference.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._streams import OurSetup, Stream, _chain, encode_indexed, make_stream, take_rows

RIVER_STREAMS = ("sea", "agrawal", "hyperplane")
REVERSALS = ("mixed_flip", "sine_flip")  # river generators whose function 1 reverses 0
STREAMS = (*RIVER_STREAMS, "demo", *REVERSALS)
REVERSAL_FUNCTIONS = (0, 1, 0, 1)  # a label reversal at each quarter
MEAN_GAP_TARGET = 5.0
WORST_GAP_TARGET = 10.0


def reversal_stream(name: str, samples: int, seed: int) -> Stream:
    """river's Mixed or Sine, switching between function 0 and its reversal 1 at each
    quarter (the same inputs, every label flipped)."""
    from river.datasets import synth

    quarters = [samples * k // 4 for k in (1, 2, 3)]
    if name == "mixed_flip":

        def make(f: int) -> Any:
            return synth.Mixed(classification_function=f, seed=seed + 100 * f)

        text = "river Mixed, functions 0->1->0->1 (1 = every label of 0 reversed), 4 features"
    elif name == "sine_flip":

        def make(f: int) -> Any:
            return synth.Sine(classification_function=f, seed=seed + 100 * f)

        text = "river Sine, functions 0->1->0->1 (SINE1 and its reversal), 2 features"
    else:
        raise ValueError(f"unknown reversal stream {name!r}")
    rows, y = take_rows(_chain(make, REVERSAL_FUNCTIONS, quarters, seed), samples)
    return Stream(name, text, rows, encode_indexed(rows), y, 2, quarters)


def demo_stream(samples: int, seed: int) -> Stream:
    """The demo's world: its seed concept for the first quarter, then the drift concept."""
    from flywheel.streams import LABELS, drift_concept, seed_concept

    first = samples // 4
    xa, ya = seed_concept(7).sample(first, sample_seed=seed)
    xb, yb = drift_concept(7).sample(samples - first, sample_seed=seed + 1)
    x = np.concatenate([xa, xb]).astype(np.float32)
    y = np.asarray([LABELS.index(v) for v in [*ya, *yb]], np.int64)
    rows = [dict(enumerate(r)) for r in x.tolist()]
    text = "demo: seed concept (RBF, 8 features, 3 classes), then the drift concept"
    return Stream("demo", text, rows, x, y, len(LABELS), [first])


def stream_of(name: str, samples: int, seed: int) -> Stream:
    if name in RIVER_STREAMS:
        return make_stream(name, samples, seed)
    if name == "demo":
        return demo_stream(samples, seed)
    return reversal_stream(name, samples, seed)


MECHANISMS = ("dp-sgd", "dp-ftrl")  # FLYWHEEL_PRIVACY_MECHANISM, side by side


def run_pair(
    stream: Stream,
    warmup: int,
    seed: int,
    epsilon: float,
    delta: float,
    mechanisms: tuple[str, ...] = MECHANISMS,
    ftrl_lr: float | None = None,
    dp_background: bool = True,
) -> dict[str, Any]:
    """Prequential correctness of the non-private arm and one DP arm per mechanism on
    `stream` (each its own ledger lineage), and what each DP arm spent."""
    import torch

    from bench._streams import warm_model
    from flywheel.feedback import ReferenceStats
    from flywheel.learner.private_step import PrivateStep
    from flywheel.learner.trainer import OnlineTrainer, TrainerConfig
    from flywheel.privacy import PrivacyLedger
    from flywheel.settings import LearnerSettings, PrivacySettings
    from flywheel.store import StoredExample, make_engine, upgrade

    learner = LearnerSettings()
    extra = {} if ftrl_lr is None else {"privacy_ftrl_lr": ftrl_lr}
    privacies = {
        mech: PrivacySettings(
            privacy_epsilon=epsilon,
            privacy_delta=delta,
            privacy_mechanism=mech,  # type: ignore[arg-type]
            **extra,  # type: ignore[arg-type]
        )
        for mech in mechanisms
    }
    setup = OurSetup()
    x, y = stream.x, stream.y
    xw, yw = x[:warmup], y[:warmup]
    module = warm_model(xw, yw, stream.n_labels, setup, seed)
    novelty = ReferenceStats.from_examples(xw.astype(np.float64))
    plain_cfg = TrainerConfig.from_settings(learner)
    plain = OnlineTrainer(module, plain_cfg, input_dim=x.shape[1], seed=seed, novelty=novelty)
    plain.remember_public(xw, yw)
    plain.remember(xw, yw)  # learner._refill: a pool under 100 rows gets the seed rows
    dps = {}
    for mech, privacy in privacies.items():
        dp_cfg = plain_cfg.private(privacy.privacy_learn_lr, mech)  # as learner/online.py
        if not dp_background:
            dp_cfg = dataclasses.replace(dp_cfg, background=None)
        dps[mech] = OnlineTrainer(
            copy.deepcopy(module), dp_cfg, input_dim=x.shape[1], seed=seed, novelty=novelty
        )
        dps[mech].remember_public(xw, yw)
    names = [f"class_{i}" for i in range(stream.n_labels)]
    labels = {n: i for i, n in enumerate(names)}
    torch.manual_seed(seed)
    n = learner.learn_batch
    hits: dict[str, list[np.ndarray]] = {m: [] for m in ("plain", *mechanisms)}
    reused = dict.fromkeys(mechanisms, 0)
    refused = dict.fromkeys(mechanisms, 0)
    with tempfile.TemporaryDirectory() as home:
        url = f"sqlite:///{Path(home) / 'store.db'}"
        upgrade(url)
        engine = make_engine(url)
        try:
            steps = {
                mech: PrivateStep(
                    privacy,
                    learner.learn_steps,
                    engine,
                    f"bench-{stream.name}-{mech}",
                    window=learner.learn_boost_window,
                )
                for mech, privacy in privacies.items()
            }
            for update, start in enumerate(range(warmup, len(y), n), 1):
                xb, yb = x[start : start + n], y[start : start + n]
                plain_hit = plain.predict(xb) == yb
                hits["plain"].append(plain_hit)
                for mech, dp in dps.items():
                    dp_hit = dp.predict(xb) == yb
                    hits[mech].append(dp_hit)
                    step = steps[mech]
                    rows = [
                        StoredExample(
                            start + i,
                            "correction",
                            "train",
                            xb[i].tolist(),
                            names[int(yb[i])],
                            1.0,
                            None if dp_hit[i] else "wrong",
                            None,
                            f"p{start + i}",
                        )
                        for i in range(len(yb))
                    ]
                    # learner.step: plan (the budget first), observe, then train
                    boosted = dp.config.elastic and dp.elastic.boosted
                    outcome = step.plan(rows, update, dp.module, reuse=boosted)
                    drift = dp.observe_errors((~dp_hit).tolist())
                    shift = dp.observe_inputs(xb)
                    if drift or shift:
                        step.change(start)
                    if outcome is None or outcome.plan is None:
                        refused[mech] += 1
                    else:
                        reused[mech] += outcome.reused
                        step.train(dp, outcome, labels)
                plain.observe_errors((~plain_hit).tolist())
                plain.observe_inputs(xb)
                plain.update(xb, yb)
            ledger = PrivacyLedger(engine)
            spent = {m: ledger.lineage_epsilon(f"bench-{stream.name}-{m}") for m in mechanisms}
        finally:
            engine.dispose()
    return {
        "plain": np.concatenate(hits["plain"]),
        "arms": {
            m: {
                "hits": np.concatenate(hits[m]),
                "epsilon": spent[m],
                "reused": reused[m],
                "refused": refused[m],
                "drifts": dps[m].elastic.drifts,
            }
            for m in mechanisms
        },
    }


def run_defaults(
    names: list[str],
    samples: int,
    warmup: int,
    seeds: int,
    epsilon: float,
    delta: float,
    ftrl_lr: float | None = None,
    dp_background: bool = True,
) -> list[dict[str, Any]]:
    """Per stream: mean prequential accuracy over the seeds of the non-private arm and of
    each DP mechanism at the same ε, and their gaps; "dp" and "gap_points" are the
    product's default mechanism (FLYWHEEL_PRIVACY_MECHANISM)."""
    from flywheel.settings import PrivacySettings

    default = PrivacySettings().privacy_mechanism
    out = []
    for name in names:
        runs = []
        for seed in range(1, seeds + 1):
            stream = stream_of(name, samples, seed)
            runs.append(
                run_pair(
                    stream,
                    warmup,
                    seed,
                    epsilon,
                    delta,
                    ftrl_lr=ftrl_lr,
                    dp_background=dp_background,
                )
            )
        plain_acc = float(np.mean([r["plain"].mean() for r in runs]))
        arms = {}
        for mech in MECHANISMS:
            acc = float(np.mean([r["arms"][mech]["hits"].mean() for r in runs]))
            arms[mech] = {
                "dp": acc,
                "gap_points": 100 * (plain_acc - acc),
                "epsilon_spent": max(r["arms"][mech]["epsilon"] for r in runs),
                "reused_examples": float(np.mean([r["arms"][mech]["reused"] for r in runs])),
                "refused_updates": float(np.mean([r["arms"][mech]["refused"] for r in runs])),
                "drifts_detected": float(np.mean([r["arms"][mech]["drifts"] for r in runs])),
            }
        out.append(
            {
                "stream": name,
                "description": stream.description,
                "non_private": plain_acc,
                "mechanism": default,
                **arms[default],
                "mechanisms": arms,
            }
        )
    return out


def verdict(results: list[dict[str, Any]], mechanism: str | None = None) -> dict[str, Any]:
    """Mean and worst gap of the default mechanism, or of `mechanism`, against the target."""
    gaps = [
        r["gap_points"] if mechanism is None else r["mechanisms"][mechanism]["gap_points"]
        for r in results
    ]
    mean, worst = float(np.mean(gaps)), float(max(gaps))
    return {
        "mean_gap_points": mean,
        "worst_gap_points": worst,
        "target": f"mean <= {MEAN_GAP_TARGET:g}, each <= {WORST_GAP_TARGET:g} points",
        "pass": mean <= MEAN_GAP_TARGET and worst <= WORST_GAP_TARGET,
    }


__all__ = ["MECHANISMS", "STREAMS", "run_defaults", "run_pair", "stream_of", "verdict"]
