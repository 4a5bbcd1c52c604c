"""Every reader of the trusted data reads the lineage's trusted set from the store.

The feedback worker's reference and neighbours, the learner's gate holdout, novelty
reference and replay, and the federated server's holdout and public replay: each reads
the trusted set of `FLYWHEEL_MODEL_NAME` (what `flywheel init` writes), uses its schema
(categorical positions) and its labels by name, and never replays a trusted set that is
not public into a DP update. Real SQLite stores and a real MLflow registry on SQLite.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from flywheel.features import Feature, FeatureSchema
from flywheel.modelspec import (
    CascadeSpec,
    ModelSpec,
    build_model,
    fit_input_scaling,
)
from flywheel.registry import Registry
from flywheel.settings import Settings, prepare_home
from flywheel.store import (
    Example,
    NoTrustedData,
    ReferenceStatsRow,
    insert_ignoring_duplicates,
    make_engine,
    require_trusted,
    session_factory,
    upgrade,
)
from tests.trusted import write_synthetic_trusted, write_trusted_set

LABELS = ["low", "high"]
SCHEMA = FeatureSchema(
    label="risk",
    labels=LABELS,
    features=[
        Feature(name="amount", kind="numeric", mean=0.0, std=1.0),
        Feature(name="country", kind="categorical", vocabulary=["DE", "FR", "JP"]),
        Feature(name="mobile", kind="boolean", fill=False),
        Feature(name="note", kind="ignore"),
    ],
)
TAGS = {
    "parent_version": "",
    "source": "manual",
    "examples": "test",
    "epsilon": "none",
    "delta": "none",
    "gate": "initial",
}


def rows(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Raw vectors of SCHEMA: high risk for FR, or a large amount on mobile."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [rng.normal(0, 1, n), rng.choice([1, 2, 3], n), rng.integers(0, 2, n)]
    ).astype(np.float32)
    high = (x[:, 1] == 2) | ((x[:, 0] > 0.5) & (x[:, 2] == 1))
    return x, [LABELS[int(h)] for h in high]


def accuracy_of(module: torch.nn.Module, x: np.ndarray, names: list[str]) -> float:
    with torch.no_grad():
        predicted = module(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean([LABELS[p] == n for p, n in zip(predicted, names, strict=True)]))


def settings_at(tmp_path, **extra: object) -> Settings:
    s = Settings(home=tmp_path / "home", seed_examples=500, **extra)  # type: ignore[arg-type]
    prepare_home(s)
    upgrade(s.resolved_database_url)
    return s


def categorical_deployment(
    s: Settings, *, public: bool, spec: object | None = None
) -> tuple[Registry, str]:
    """The categorical trusted set and an embedding + MLP champion trained on it."""
    train, holdout = rows(400, 1), rows(100, 2)
    write_trusted_set(s.resolved_database_url, s.model_name, SCHEMA, train, holdout, public=public)
    spec = spec or ModelSpec(
        input_dim=3, hidden=[16], labels=LABELS, schema=SCHEMA, embedding_dim=4
    )
    torch.manual_seed(0)
    module = build_model(spec)  # type: ignore[arg-type]
    fit_input_scaling(module, torch.from_numpy(train[0]))
    registry = Registry.of(s)
    version = registry.publish(spec, module, tags=TAGS)  # type: ignore[arg-type]
    registry.set_champion(version)
    return registry, version


def add_corrections(url: str, n: int, seed: int) -> None:
    x, names = rows(n, seed)
    engine = make_engine(url)
    with session_factory(engine).begin() as session:
        insert_ignoring_duplicates(
            session,
            Example,
            [
                {
                    "dedup_key": f"c:{seed}:{i}",
                    "origin": "correction",
                    "features": row.tolist(),
                    "label": label,
                    "weight": 1.0,
                    "split": "train",
                    "source": f"user-{seed}-{i}",
                    "parent_prediction_id": f"p{seed}-{i}",
                    "error_type": "confident",
                }
                for i, (row, label) in enumerate(zip(x, names, strict=True))
            ],
        )
    engine.dispose()


# --- the feedback worker -----------------------------------------------------------------------


def test_the_worker_reference_comes_from_the_trusted_set(tmp_path, caplog):
    from flywheel.feedback.reference import ReferenceStats
    from flywheel.feedback.reference_data import LabelledPool, ensure_reference

    s = settings_at(tmp_path)
    engine = make_engine(s.resolved_database_url)
    sessions = session_factory(engine)
    with sessions() as session, pytest.raises(NoTrustedData, match="run `flywheel init"):
        ensure_reference(session, s.registry)
    train, holdout = rows(400, 1), rows(100, 2)
    write_trusted_set(s.resolved_database_url, s.model_name, SCHEMA, train, holdout)
    # another lineage in the same store, whose name LIKE would match unescaped
    other = s.model_copy(update={"model_name": "flywheel_b"})
    write_synthetic_trusted(other)
    write_synthetic_trusted(s.model_copy(update={"model_name": "flywheelxb"}))
    with sessions() as session:
        reference = ensure_reference(session, s.registry)  # no row yet: from the rows
        assert reference.categorical == (1,) and reference.boolean == (2,)
        assert reference.seen_codes == ((1, 2, 3),)
        assert reference == ReferenceStats.from_examples(
            train[0].astype(np.float64), categorical=[1], boolean=[2]
        )
        pool = LabelledPool.load(session, reference, s.model_name)
        assert len(pool) == 400 and pool.labels() == frozenset(LABELS)
        assert np.array_equal(pool.points, train[0].astype(np.float64))
        b = other.registry
        pool_b = LabelledPool.load(session, ensure_reference(session, b), b.model_name)
        assert len(pool_b) == 400 and pool_b.labels() <= {"class_0", "class_1", "class_2"}
    # a reference row written before categorical positions were kept: recomputed
    numeric = ReferenceStats.from_examples(train[0].astype(np.float64))
    with sessions.begin() as session:
        session.add(
            ReferenceStatsRow(model_name=s.model_name, stats=numeric.to_dict(), example_count=400)
        )
    with sessions() as session, caplog.at_level(logging.WARNING):
        assert ensure_reference(session, s.registry) == reference
    assert "do not fit its trusted set's schema" in caplog.text
    engine.dispose()


class _Champion:
    def __init__(self, version: str | None) -> None:
        self.version = version

    def champion_version(self) -> str | None:
        return self.version


def test_a_worker_waits_for_the_trusted_set_only_while_the_registry_is_empty(tmp_path):
    from flywheel.feedback.runner import wait_for_trusted_set

    s = settings_at(tmp_path)
    engine = make_engine(s.resolved_database_url)
    started = time.monotonic()
    with pytest.raises(NoTrustedData, match="'flywheel'"):  # a champion, no trusted set
        wait_for_trusted_set(engine, "flywheel", _Champion("1"), timeout_s=30, poll_s=0.05)  # type: ignore[arg-type]
    assert time.monotonic() - started < 10, "nothing will write it: refuse at once"
    with pytest.raises(NoTrustedData):  # an empty registry: waits, then gives up
        wait_for_trusted_set(engine, "flywheel", _Champion(None), timeout_s=0.3, poll_s=0.05)  # type: ignore[arg-type]
    writer = threading.Timer(0.3, write_synthetic_trusted, args=(s,))
    writer.start()
    try:  # the bootstrap writes it meanwhile
        wait_for_trusted_set(engine, "flywheel", _Champion(None), timeout_s=60, poll_s=0.05)  # type: ignore[arg-type]
    finally:
        writer.join()
    engine.dispose()


# --- the online learner ------------------------------------------------------------------------


def _learner(s: Settings):
    from flywheel.learner import LearnerConfig, OnlineLearner

    learner = OnlineLearner(LearnerConfig.of(s), Registry.of(s))
    learner.start()
    return learner


@pytest.mark.parametrize(
    "public,privacy,replayed",
    [(True, True, True), (False, True, False), (False, False, True)],
)
def test_a_private_trusted_set_is_never_replayed_while_privacy_is_on(
    tmp_path, public, privacy, replayed
):
    s = settings_at(tmp_path, privacy_enabled=privacy)
    registry, _ = categorical_deployment(s, public=public)
    learner = _learner(s)
    trainers = [learner._trainer] + ([learner._shadow] if privacy else [])
    for trainer in trainers:
        assert trainer is not None
        assert trainer.public.size == (400 if replayed else 0)
    # the plain updates' replay pool (the run without DP, or the learner without privacy)
    # starts from the trusted rows where they may be used
    assert trainers[-1] is not None and trainers[-1].reservoir.size == (400 if replayed else 0)
    # the gate's trusted holdout is the trusted set's, labels by name
    assert len(learner._trusted) == 100 and learner._trusted.unknown == 0
    holdout = rows(100, 2)
    expected = accuracy_of(registry.load(registry.champion_version()).module, *holdout)
    assert accuracy_of(learner._trainer.module, *holdout) == expected


def test_the_learner_refuses_a_lineage_without_a_trusted_set_and_a_cascade(tmp_path):
    s = settings_at(tmp_path)
    spec = ModelSpec(input_dim=3, hidden=[8], labels=LABELS, schema=SCHEMA)
    registry = Registry.of(s)
    registry.set_champion(registry.publish(spec, build_model(spec), tags=TAGS))
    with pytest.raises(NoTrustedData, match="flywheel init"):
        _learner(s)
    train, holdout = rows(400, 1), rows(100, 2)
    write_trusted_set(s.resolved_database_url, s.model_name, SCHEMA, train, holdout)
    _learner(s)  # a logistic-free MLP over a schema trains
    cascade = CascadeSpec(input_dim=3, labels=LABELS, light=[4], heavy=[8], schema=SCHEMA)
    from flywheel.modelspec import build_module

    registry.set_champion(registry.publish(cascade, build_module(cascade), tags=TAGS))
    with pytest.raises(ValueError, match="not cascades"):
        _learner(s)


def test_an_embedding_model_trains_under_dp_with_opacus_in_the_learner(tmp_path):
    """embed_mlp has trainable nn.Embedding layers, which the fused kernel does not clip:
    "auto" resolves to Opacus, and the update is accounted and published like any other."""
    from flywheel.privacy import resolve_engine

    s = settings_at(
        tmp_path,
        privacy_enabled=True,
        learn_batch=100,
        learn_cursor_grace_s=0.0,
        gate_min_holdout=5,
        privacy_source_updates=20,
    )
    registry, v1 = categorical_deployment(s, public=True)
    assert resolve_engine("auto", registry.load(v1).module) == "opacus"
    add_corrections(s.resolved_database_url, 100, seed=3)
    learner = _learner(s)
    before = {k: v.clone() for k, v in learner._trainer.module.state_dict().items()}
    candidate = learner.step()
    assert candidate is not None
    info = registry.info(candidate.version, with_run=True)
    assert info.params["dp"] == "True" and info.params["dp_engine"] == "opacus"
    assert float(info.tags["epsilon"]) > 0
    after = registry.load(candidate.version).module.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("embedding" in k for k in moved), moved


def test_dp_sgd_with_opacus_fits_an_embedding_model():
    """The DP update on its own: an embed_mlp model learns a rule that needs the
    categorical embedding (FR is high risk) under clipping and noise."""
    from flywheel.privacy import PrivateBatch, dp_update

    x, names = rows(600, 4)
    y = np.asarray([LABELS.index(n) for n in names])
    spec = ModelSpec(input_dim=3, hidden=[16], labels=LABELS, schema=SCHEMA, embedding_dim=4)
    torch.manual_seed(1)
    module = build_model(spec)
    fit_input_scaling(module, torch.from_numpy(x))
    before = accuracy_of(module, *rows(300, 5))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    batch = PrivateBatch(
        x=x,
        y=y,
        weight=np.ones(len(y), np.float32),
        sources=np.arange(len(y)),
        public=np.zeros(len(y), bool),
    )
    stats = dp_update(
        module,
        optimizer,
        batch,
        steps=60,
        sample_rate=0.5,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.engine == "opacus"
    after = accuracy_of(module, *rows(300, 5))
    assert after > 0.85 and after > before + 0.1, (before, after)


# --- the federated server and sites ------------------------------------------------------------


def test_public_replay_is_only_ever_the_rows_of_a_public_trusted_set(tmp_path):
    from flywheel.learner.federated.server import public_replay_rows

    s = settings_at(tmp_path)
    train, holdout = rows(400, 1), rows(100, 2)
    for name, public in (("open", True), ("closed", False)):
        write_trusted_set(s.resolved_database_url, name, SCHEMA, train, holdout, public=public)
    engine = make_engine(s.resolved_database_url)
    with session_factory(engine)() as session:
        open_set = require_trusted(session, "open")
        closed = require_trusted(session, "closed")
    engine.dispose()
    x, y = public_replay_rows(open_set, ["high", "low", "other"])  # the model's own order
    assert np.array_equal(x, train[0])
    assert [["high", "low", "other"][i] for i in y] == train[1]
    x, y = public_replay_rows(closed, LABELS)
    assert x.shape == (0, 3) and len(y) == 0
    # a model without one of the labels replays only the rows it can learn
    x, y = public_replay_rows(open_set, ["low", "unrelated"])
    assert len(y) == train[1].count("low") and set(y.tolist()) == {0}


def test_the_federated_holdouts_come_from_the_platform_store(tmp_path):
    from flywheel.learner.federated.config import FederatedConfig
    from flywheel.learner.federated.server import FederatedRun, RunOptions

    s = settings_at(tmp_path)
    config = FederatedConfig.of(s)
    run = FederatedRun(config, RunOptions.from_settings(s.federated, s.trusted), Registry.of(s))
    with pytest.raises(NoTrustedData):
        run.holdouts(LABELS)
    train, holdout = rows(400, 1), rows(100, 2)
    write_trusted_set(s.resolved_database_url, s.model_name, SCHEMA, train, holdout)
    trusted, recent = run.holdouts(["high", "low"])
    assert np.array_equal(trusted.x, holdout[0]) and len(recent) == 0
    assert [["high", "low"][i] for i in trusted.y] == holdout[1]
    run.engine.dispose()


def _round(spec: object) -> object:
    from flwr.app import ConfigRecord, RecordDict

    from flywheel.learner.federated.records import to_record
    from flywheel.modelspec import build_module

    module = build_module(spec, factories=("tests",))  # type: ignore[arg-type]
    return RecordDict(
        {
            "arrays": to_record(module.state_dict()),
            "config": ConfigRecord(
                {
                    "model-spec": spec.model_dump_json(),  # type: ignore[attr-defined]
                    "seed": 1,
                    "server-round": 1,
                    "local-steps": 2,
                }
            ),
        }
    )


@pytest.mark.parametrize("family", ["embed_mlp", "factory"])
def test_a_site_trains_a_schema_model_and_a_trusted_factory_model(tmp_path, family):
    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.partition import fill_site_store
    from flywheel.modelspec import FactoryError, FactorySpec

    s = settings_at(tmp_path, privacy_source_updates=100, model_factories="tests")
    x, names = rows(120, 6)
    fill_site_store(
        s.resolved_database_url,
        x,
        np.asarray([LABELS.index(n) for n in names]),
        site="s",
        names=LABELS,
    )
    if family == "embed_mlp":
        spec = ModelSpec(input_dim=3, hidden=[8], labels=LABELS, schema=SCHEMA, embedding_dim=4)
    else:
        spec = FactorySpec(
            factory="tests.model_factories:two_layers",
            options={"hidden": 8},
            input_dim=3,
            labels=LABELS,
            schema=SCHEMA,
        )
    state, metrics = Site.of(s).train(_round(spec))  # type: ignore[arg-type]
    assert metrics["num-examples"] > 0
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if family == "factory":  # a site that does not trust the factory's package refuses it
        untrusting = settings_at(tmp_path / "other", privacy_source_updates=100)
        with pytest.raises(FactoryError, match="not trusted"):
            Site.of(untrusting).train(_round(spec))  # type: ignore[arg-type]


def test_a_federated_round_trains_an_embedding_model_and_gates_it_on_the_trusted_set(
    tmp_path, caplog, monkeypatch
):
    """One round over two in-process sites: the platform reads its trusted set (a private
    one: no public replay is sent), the sites build the embed_mlp model from the spec
    with its schema, and the aggregate is gated on the trusted holdout and registered."""
    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.config import FederatedConfig
    from flywheel.learner.federated.inprocess import InProcessGrid
    from flywheel.learner.federated.partition import fill_site_store
    from flywheel.learner.federated.server import FederatedRun, RunOptions

    common = {"privacy_source_updates": 10, "fed_poll_s": 0.05, "fed_public_replay": 50}
    platform = settings_at(tmp_path / "platform", **common)
    registry, v1 = categorical_deployment(platform, public=False)
    sites = []
    for k in range(2):
        site = settings_at(tmp_path / f"site{k}", **common)
        x, names = rows(150, 10 + k)
        y = np.asarray([LABELS.index(n) for n in names])
        fill_site_store(site.resolved_database_url, x, y, site=f"site{k}", names=LABELS)
        sites.append(Site.of(site))
    options = RunOptions.from_settings(
        platform.federated, platform.trusted, rounds=1, clients=2, min_clients=2, local_steps=3
    )
    sent: list[object] = []
    original = Site.train
    monkeypatch.setattr(Site, "train", lambda self, c: sent.append(c) or original(self, c))
    grid = InProcessGrid(sites)
    try:
        with caplog.at_level(logging.WARNING, logger="flywheel.learner.federated.server"):
            summary = FederatedRun(FederatedConfig.of(platform), options, registry).run(grid)
    finally:
        grid.close()
    assert "ignored: the trusted set of flywheel is not public" in caplog.text
    assert len(sent) == 2
    assert all("public-x" not in c.config_records["config"] for c in sent)  # type: ignore[attr-defined]
    (record,) = summary.rounds
    assert record.replied == 2 and 0 <= record.trusted_accuracy <= 1
    assert summary.version is not None and summary.version != v1
    info = registry.info(summary.version)
    assert info.tags["source"] == "federated" and "trusted" in info.tags["gate"]
    new = registry.load(summary.version)
    assert new.spec.schema == SCHEMA and new.spec.family == "embed_mlp"
