"""Federated learning with real processes on loopback: one SuperLink, three SuperNodes
(`flywheel fed superlink` / `flywheel fed client`), Dirichlet(0.5) label-skewed sites,
each with its own SQLite training store and privacy ledger; the platform's store holds the
union's holdout, its MLflow registry the champion the service follows.

One federation serves the module: run 1 (FedAvg + client-side clipping, published and
served), run 2 (FedMedian + server-side clipping, honest, not published); then site 2 is
restarted as a malicious site (update boosted ×10) for run 3 (same robust strategy).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from flywheel.broker import ensure_topics
from flywheel.learner.evaluation import Holdout, accuracy
from flywheel.learner.federated.client_app import Site
from flywheel.learner.federated.demo import build_homes
from flywheel.learner.federated.partition import make_partition
from flywheel.learner.federated.processes import LocalFederation
from flywheel.learner.federated.server import RunOptions
from flywheel.learner.seed_model import ensure_champion
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import Settings
from tests.conftest import make_app_key
from tests.deadlines import deadline

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 8
ROBUST_ROUNDS = 3
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def fed(tmp_path_factory, broker):
    root = tmp_path_factory.mktemp("federation")
    os.environ["PYTHONPATH"] = os.pathsep.join(  # the malicious site's ClientApp module
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    partition = make_partition(3, alpha=0.5)
    suffix = root.name[-8:]
    platform, sites = build_homes(
        # each site budgets ε=8 per source over all rounds of this module (default: 3);
        # at ε=3 five noisy rounds do not reliably separate federated from local-only
        root,
        3,
        partition,
        rounds=ROUNDS + 2 * ROBUST_ROUNDS,
        privacy_epsilon=8.0,
        # sync often: 10 DP-SGD steps a round (bench fedaccuracy: more, shorter rounds
        # let the server's averaging of the noisy releases work)
        fed_local_steps=10,
        kafka_bootstrap=broker.bootstrap,
        topic_predictions=f"fp-{suffix}",
        topic_corrections=f"fc-{suffix}",
        topic_model_events=f"fm-{suffix}",
        topic_deadletter=f"fd-{suffix}",
        topic_scores=f"fs-{suffix}",
        registry_poll_s=1.0,
        kafka_timeout_s=2.0,
    )
    ensure_topics(broker.bootstrap, platform.topics, 1)
    # each site's own fixed noise seed: the honest and attacked runs below are paired
    sites = [
        s.model_copy(update={"fed_audit_dir": root / f"audit{k}", "fed_site_noise_seed": k})
        for k, s in enumerate(sites)
    ]
    ensure_champion(platform.trusted, Registry.of(platform))
    federation = LocalFederation(platform, sites, logs=root / "logs").start()
    try:
        federation.wait_for_sites(3, timeout_s=deadline(120))
        yield federation, partition, root
    finally:
        federation.stop()


def options(fed_, **kw) -> RunOptions:
    federation, _, root = fed_
    return RunOptions.from_settings(
        federation.platform.federated,
        federation.platform.trusted,
        clients=3,
        min_clients=3,
        report=str(root / f"run-{len(RESULTS)}.json"),
        **kw,
    )


def test_federated_model_is_registered_promoted_and_served(fed):
    federation, partition, root = fed
    platform = federation.platform
    from flywheel.registry import Registry
    from flywheel.service import ServiceConfig, create_app

    headers = make_app_key(platform.resolved_database_url).headers  # its store is migrated
    with TestClient(create_app(ServiceConfig.of(platform)), headers=headers) as service:
        assert service.get("/v1/model").json()["version"] == "1"
        # central noise seeded: the local-only comparison below reads one run, and an
        # unseeded run of five noisy rounds ranged 0.70-0.80 on the union holdout
        summary = federation.run(
            options(fed, rounds=ROUNDS, strategy="fedavg", clipping="client", noise_seed=1)
        )
        RESULTS["fedavg"] = summary
        assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
        assert all(r["replied"] == 3 for r in summary["rounds"])
        assert summary["version"] and summary["promoted"], summary["gate"]
        info = Registry.of(platform).info(summary["version"])
        assert info.tags["source"] == "federated" and info.is_champion
        assert float(info.tags["epsilon"]) == pytest.approx(summary["epsilon"], rel=1e-3)
        assert info.tags["delta"] == f"{platform.privacy_delta:g}"
        until = time.monotonic() + deadline(30)
        while service.get("/v1/model").json()["version"] != summary["version"]:
            assert time.monotonic() < until, "the service did not swap to the new version"
            time.sleep(0.2)
        pred = service.post("/v1/predict", json={"instances": partition.holdout[0][:2].tolist()})
        assert pred.status_code == 200 and pred.json()["model"]["version"] == summary["version"]


def test_federated_model_beats_each_sites_local_only_model(fed, tmp_path):
    """Each site alone, the same rounds of the same local training (a copy of its store,
    so its real ledger is untouched) and the same post-processing of its updates as the
    platform's (server momentum, the mean of the last global models), scored on the
    union's holdout."""
    federation, partition, _ = fed
    summary = RESULTS["fedavg"]
    from flwr.app import ConfigRecord, RecordDict

    from flywheel.learner.federated.records import to_record
    from flywheel.registry import Registry

    union = Holdout(*partition.holdout)
    start = Registry.of(federation.platform).load(summary["start_version"])
    federated = accuracy(Registry.of(federation.platform).load(summary["version"]).module, union)
    o = options(fed, rounds=ROUNDS)
    from flywheel.store.trusted import seed_data

    px, py, _, _ = seed_data(federation.platform.trusted)
    local = []
    for k, site_settings in enumerate(federation.sites):
        home = tmp_path / f"local{k}"
        shutil.copytree(site_settings.home_dir, home, ignore=shutil.ignore_patterns("flwr"))
        # another model name = another privacy lineage: the site's ledger copy already holds
        # the federated rounds' spend, and this alternative history must not pay it twice
        site = Site.of(
            Settings(**{**site_settings.model_dump(), "home": home, "model_name": "local-only"})
        )
        module = start.module
        post = o.server_optimizer([n for n, _ in module.named_parameters()])
        for rnd in range(1, ROUNDS + 1):
            pick = np.random.default_rng(o.seed * 7919 + rnd).choice(
                len(py), size=o.public_replay, replace=False
            )
            content = RecordDict(
                {
                    "arrays": to_record(module.state_dict()),
                    "config": ConfigRecord(
                        {
                            "server-round": rnd,
                            "seed": o.seed,
                            "model-spec": start.spec.model_dump_json(),
                            "local-steps": o.local_steps,
                            "local-lr": o.local_lr,
                            "clip": o.clip,
                            "public-x": px[pick].tobytes(),
                            "public-y": py[pick].astype(np.int64).tobytes(),
                        }
                    ),
                }
            )
            state, _ = site.train(content)
            module.load_state_dict(post.step(module.state_dict(), state))
        module.load_state_dict(post.served(module.state_dict()))
        local.append(accuracy(module, union))
    print(f"federated {federated:.3f} vs local-only {[round(a, 3) for a in local]}")
    assert federated > max(local) + 0.01, (federated, local)


def test_no_message_leaving_a_site_carries_raw_data(fed):
    """Every reply each site sent (its audit copy, serialized as sent) holds the model's
    arrays and allowed scalar metrics only: no feature row, label, source or example id."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from flywheel.learner.federated.records import REPLY_METRICS
    from flywheel.store import make_engine

    federation, _, root = fed
    first = Registry.of(federation.platform).load(ModelVersion("1")).module  # the lineage's
    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    for k, site in enumerate(federation.sites):
        audits = sorted((root / f"audit{k}").glob("*.json"))
        assert len(audits) >= ROUNDS, f"site {k} audited {len(audits)} messages"
        engine = make_engine(site.resolved_database_url)
        with engine.connect() as c:
            rows = c.exec_driver_sql(
                "SELECT id, dedup_key, features, label, source, parent_prediction_id FROM examples"
            ).all()
        engine.dispose()
        assert rows
        needles = [
            np.asarray(json.loads(r[2]) if isinstance(r[2], str) else r[2], np.float32).tobytes()
            for r in rows
        ]
        strings = {s.encode() for r in rows for s in (r[1], r[3], r[4], r[5]) if s}
        for meta_path in audits:
            meta = json.loads(meta_path.read_text())
            assert meta["blocked"] is None and not meta["error"], meta
            body = meta_path.with_suffix(".bin").read_bytes()
            proto = ProtoRecordDict()
            proto.ParseFromString(body)
            content = recorddict_from_proto(proto)
            assert set(content.keys()) == {"arrays", "metrics"}
            arrays = content.array_records["arrays"]
            assert {n: tuple(a.shape) for n, a in arrays.items()} == shapes
            assert set(content.metric_records["metrics"].keys()) <= REPLY_METRICS
            assert not any(s in body for s in strings), "a label or an id left the site"
            assert not any(row in body for row in needles), "a feature row left the site"


def test_client_level_epsilon_of_every_round_is_in_the_ledger(fed):
    from flywheel.privacy import PrivacyLedger
    from flywheel.store import open_store

    federation, _, _ = fed
    summary = RESULTS["fedavg"]
    lineage = f"{federation.platform.model_name}:federated"
    entries = PrivacyLedger(open_store(federation.platform.resolved_database_url)).entries(lineage)
    mine = [e for e in entries if e.version == summary["version"]]
    assert len(mine) == ROUNDS
    for e, r in zip(mine, summary["rounds"], strict=True):
        assert e.epsilon_update == pytest.approx(r["epsilon_round"])
        assert e.epsilon_lineage == pytest.approx(r["epsilon_cumulative"])
        assert e.sources == 3 and e.mechanism.sample_rate == 1.0
    assert mine[-1].epsilon_lineage > mine[0].epsilon_lineage  # composes over rounds
    # and each site accounted its own sources' ε in its own ledger
    for site in federation.sites:
        local = PrivacyLedger(open_store(site.resolved_database_url)).entries(lineage)
        assert len(local) >= ROUNDS and all(
            e.epsilon_lineage <= site.privacy_epsilon for e in local
        )


def test_one_malicious_site_costs_the_robust_aggregate_at_most_two_points(fed):
    federation, _, _ = fed
    robust = {
        "rounds": ROBUST_ROUNDS,
        "strategy": "median",
        "clipping": "server",
        "publish": False,
        "noise_seed": 1,
    }
    honest = federation.run(options(fed, **robust))
    RESULTS["honest"] = honest
    federation.stop()
    federation.site_args[2] = ["--app", "tests.integration.fed_attack:app"]
    federation.start()
    federation.wait_for_sites(3, timeout_s=deadline(120))
    attacked = federation.run(options(fed, **robust))
    a, b = honest["final_recent_accuracy"], attacked["final_recent_accuracy"]
    print(f"median+server clipping: honest {a:.3f}, one site ×10 {b:.3f}")
    assert honest["start_version"] == attacked["start_version"]
    # With three sites the coordinate-wise median of {honest, honest, ×10} is, per weight,
    # the larger honest update instead of the middle one: the aggregate moves either way
    # (seen: honest 0.776, attacked 0.806 with init's trusted set). What robustness
    # promises is that the attack cannot cost accuracy: at most two points down.
    assert b >= a - 0.02, (a, b)
