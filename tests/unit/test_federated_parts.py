"""Federated learning parts without processes: partitions, clipping, the outbound guard,
client-level accounting, security checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flywheel.learner.federated.local import clip_update, update_norm
from flywheel.learner.federated.partition import dirichlet_split
from flywheel.learner.federated.postprocess import ServerOptimizer
from flywheel.learner.federated.processes import (
    SecurityError,
    is_loopback,
    superlink_command,
    supernode_command,
)
from flywheel.learner.federated.records import check_reply, outbound_guard
from flywheel.learner.federated.strategy import build_strategy, client_mechanism
from flywheel.privacy import epsilon
from flywheel.settings import Settings


def test_server_optimizer_averages_the_last_global_models_and_leaves_buffers():
    opt = ServerOptimizer(["w"], average_last=2)
    g0 = {"w": torch.zeros(3), "buf": torch.ones(1)}
    g1 = opt.step(g0, {"w": torch.full((3,), 2.0), "buf": torch.ones(1)})
    assert torch.equal(g1["w"], torch.full((3,), 2.0))  # lr 1, no momentum: the release
    assert torch.equal(opt.served(g1)["w"], g1["w"])  # one model so far: itself
    g2 = opt.step(g1, {"w": torch.full((3,), 4.0), "buf": torch.ones(1)})
    g3 = opt.step(g2, {"w": torch.full((3,), 8.0), "buf": torch.ones(1)})
    served = opt.served(g3)
    assert torch.allclose(served["w"], torch.full((3,), 6.0))  # mean of g2 and g3 only
    assert torch.equal(served["buf"], g3["buf"])
    opt.reset()  # the champion moved: the old line is not averaged in
    assert torch.equal(opt.served(g3)["w"], g3["w"])


def test_server_momentum_accumulates_released_updates():
    opt = ServerOptimizer(["w"], lr=0.5, momentum=0.5)
    g1 = opt.step({"w": torch.zeros(2)}, {"w": torch.full((2,), 2.0)})
    assert torch.allclose(g1["w"], torch.full((2,), 1.0))  # 0.5 · (2 − 0)
    g2 = opt.step(g1, {"w": torch.full((2,), 3.0)})
    # m = 0.5 · 2 + (3 − 1) = 3, g2 = 1 + 0.5 · 3
    assert torch.allclose(g2["w"], torch.full((2,), 2.5))
    with pytest.raises(ValueError):
        ServerOptimizer(["w"], momentum=1.0)


def test_fltrust_steps_half_way_with_momentum_unless_told_otherwise(tmp_path):
    """FLTrust's release always moves the model by the reference's norm, so its global
    models alternated round to round (bench fedrobust --world same, seed 7: 0.512-0.880
    on the union holdout in rounds 4-10); its default server step is 0.5 with momentum
    0.5. The other strategies keep the release itself; a run's options still win."""
    from flywheel.learner.federated.server import RunOptions

    s = Settings(home=tmp_path)

    def options(**kw: object) -> RunOptions:
        return RunOptions.from_settings(s.federated, s.trusted, **kw)

    assert options(strategy="fltrust").server_step() == (0.5, 0.5)
    for name in ("fedavg", "trimmed", "median"):
        assert options(strategy=name).server_step() == (1.0, 0.0)
    assert options(strategy="fltrust", server_momentum=0.0).server_step() == (0.5, 0.0)
    assert options(strategy="fltrust", server_lr=1.0, server_momentum=0.0).server_step() == (
        1.0,
        0.0,
    )
    assert options(strategy="fedavg", server_momentum=0.9).server_step() == (1.0, 0.9)
    opt = options(strategy="fltrust").server_optimizer(["w"])
    assert (opt.lr, opt.momentum) == (0.5, 0.5)


def test_dirichlet_split_covers_every_row_once_and_skews_labels():
    y = np.repeat(np.arange(3), 400)
    parts = dirichlet_split(y, 3, 0.5, np.random.default_rng(0))
    together = np.sort(np.concatenate(parts))
    assert np.array_equal(together, np.arange(len(y)))
    shares = np.array([np.bincount(y[p], minlength=3) / len(p) for p in parts])
    assert shares.max() > 0.6  # label skew: some site is dominated by one class


def test_clip_update_bounds_the_update_and_keeps_small_ones():
    base = {"w": torch.zeros(4), "b": torch.zeros(2)}
    big = {"w": torch.full((4,), 3.0), "b": torch.full((2,), 3.0)}
    clipped, norm = clip_update(big, base, 2.0)
    assert norm == pytest.approx(3.0 * 6**0.5)
    assert update_norm(clipped, base) == pytest.approx(2.0, rel=1e-5)
    small = {"w": torch.full((4,), 0.1), "b": torch.zeros(2)}
    same, _ = clip_update(small, base, 2.0)
    assert torch.equal(same["w"], small["w"])


def _message() -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, 0
    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": torch.zeros(2, 3)}),
                "config": ConfigRecord({"server-round": 1}),
            }
        ),
        message_type="train",
        dst_node_id=1,
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _context() -> Context:
    return Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_outbound_guard_passes_a_model_update_and_aggregate_metrics():
    def handler(msg: Message, _ctx: Context) -> Message:
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
                    "metrics": MetricRecord({"num-examples": 5.0, "train-loss": 0.3}),
                }
            ),
            reply_to=msg,
        )

    reply = outbound_guard(_message(), _context(), handler)
    assert not reply.has_error()


@pytest.mark.parametrize(
    "content",
    [
        {
            "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
            "metrics": MetricRecord({"num-examples": 5.0}),
            "rows": ArrayRecord({"x": torch.ones(5, 8)}),
        },  # an extra record (raw rows)
        {
            "arrays": ArrayRecord({"w": torch.ones(2, 3), "x": torch.ones(5, 8)}),
            "metrics": MetricRecord({"num-examples": 5.0}),
        },  # rows hidden among the arrays
        {
            "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
            "metrics": MetricRecord({"num-examples": 5.0, "label-0": 1.0}),
        },  # per-label metric
        {
            "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
            "metrics": MetricRecord({"train-loss": [0.1, 0.2, 0.3]}),
        },  # a list, not a scalar
        {
            "arrays": ArrayRecord({"w": torch.ones(2, 3)}),
            "metrics": MetricRecord({"num-examples": 1.0}),
            "config": ConfigRecord({"example-ids": "12,13"}),
        },
    ],
)
def test_outbound_guard_blocks_anything_else(content, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_FED_AUDIT_DIR", str(tmp_path))
    reply = outbound_guard(
        _message(), _context(), lambda msg, _c: Message(RecordDict(content), reply_to=msg)
    )
    assert reply.has_error() and "blocked by site" in reply.error.reason
    assert list(tmp_path.glob("*.bin"))[0].read_bytes() == b""  # nothing was sent
    assert check_reply(reply, {"w": (2, 3)}) is None


def test_client_level_epsilon_composes_and_robust_aggregation_costs_more():
    mean = client_mechanism("fedavg", 1.0, 3)
    median = client_mechanism("median", 1.0, 3)
    assert mean.noise_multiplier == 1.0 and mean.sample_rate == 1.0
    assert median.noise_multiplier == pytest.approx(1.0 / (2 * 3 * 2.0))
    assert epsilon([mean] * 2, 1e-5) > epsilon([mean], 1e-5)
    assert epsilon([median], 1e-5) > epsilon([mean], 1e-5)


@pytest.mark.parametrize(
    "name,clipping", [("fedavg", "client"), ("trimmed", "server"), ("median", "client")]
)
def test_strategies_are_wrapped_in_flowers_dp_fixed_clipping(name, clipping):
    s = build_strategy(name, sites=3, clip=2.0, noise_multiplier=0.5, clipping=clipping)
    assert type(s).__name__ == f"DifferentialPrivacy{clipping.title()}SideFixedClipping"
    assert s.clipping_norm == 2.0 and s.num_sampled_clients == 3
    with pytest.raises(ValueError):
        build_strategy("krum", sites=3, clip=1.0, noise_multiplier=1.0)


def test_insecure_mode_is_loopback_only_and_says_so(tmp_path, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("example.com")
    s = Settings(home=tmp_path, fed_superlink="127.0.0.1:9093")
    with caplog.at_level(logging.WARNING):
        cmd = superlink_command(s.federated, tls=False, auth=False)
    assert "--insecure" in cmd and "loopback" in caplog.text and "INSECURE" in caplog.text
    remote = Settings(home=tmp_path, fed_superlink="10.0.0.5:9093")
    with pytest.raises(SecurityError, match="loopback"):
        superlink_command(remote.federated, tls=False, auth=False)
    with pytest.raises(SecurityError, match="loopback"):
        supernode_command(remote.federated, tls=False, auth=False, runtime_port=9094)
    with pytest.raises(SecurityError, match="needs --tls"):
        superlink_command(s.federated, tls=False, auth=True)


def test_tls_and_auth_flags_map_to_flower_options(tmp_path):
    files = {n: tmp_path / f"{n}.pem" for n in ("ca", "cert", "key", "node")}
    for f in files.values():
        f.write_text("x")
    s = Settings(
        home=tmp_path,
        fed_superlink="10.0.0.5:9093",
        fed_tls_ca=files["ca"],
        fed_tls_cert=files["cert"],
        fed_tls_key=files["key"],
        fed_auth_key=files["node"],
    )
    link = superlink_command(s.federated, tls=True, auth=True)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(files["cert"])
    node = supernode_command(s.federated, tls=True, auth=True, runtime_port=9094)
    assert node[node.index("--root-certificates") + 1] == str(files["ca"])
    assert node[node.index("--auth-supernode-private-key") + 1] == str(files["node"])
    assert "--isolation" in node and "process" in node
    with pytest.raises(SecurityError, match="FLYWHEEL_FED_TLS_KEY"):
        superlink_command(
            s.model_copy(update={"fed_tls_key": None}).federated, tls=True, auth=False
        )


def test_a_site_trains_at_the_federated_sampling_rate_not_the_online_learners(tmp_path):
    from flywheel.learner.federated.client_app import site_dp_config

    s = Settings(
        home=tmp_path, privacy_sample_rate=0.5, fed_privacy_sample_rate=0.8, privacy_epsilon=4.0
    )
    dp = site_dp_config(s.privacy, s.federated)
    assert dp.sample_rate == 0.8 and dp.epsilon == 4.0  # the rest: the privacy settings
    assert dp.mechanism(10).sample_rate == 0.8
    assert Settings(home=tmp_path).fed_privacy_sample_rate == 1.0
    with pytest.raises(ValueError, match="fed_privacy_sample_rate"):
        Settings(home=tmp_path, fed_privacy_sample_rate=0)


# -- what the server accepts from a site, and what a site accepts from the server -------------
def _reply(arrays: dict, metrics: dict) -> Message:
    return Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
        reply_to=_message(),
    )


GOOD_METRICS = {"num-examples": 40.0, "dp-weight": 1.0, "train-loss": 0.5}


@pytest.mark.parametrize(
    "arrays,metrics,why",
    [
        ({"w": torch.full((2, 3), float("nan"))}, GOOD_METRICS, "holds NaN or infinity"),
        ({"w": torch.full((2, 3), float("inf"))}, GOOD_METRICS, "holds NaN or infinity"),
        ({"w": torch.ones(3, 2)}, GOOD_METRICS, "names or shapes"),
        ({"w": torch.ones(2, 3), "v": torch.ones(1)}, GOOD_METRICS, "names or shapes"),
        ({"w": torch.ones(2, 3)}, {"num-examples": -1000.0, "dp-weight": 1.0}, "must be a count"),
        ({"w": torch.ones(2, 3)}, {"num-examples": 2.5, "dp-weight": 1.0}, "must be a count"),
        ({"w": torch.ones(2, 3)}, {"num-examples": float("nan"), "dp-weight": 1.0}, "finite"),
        ({"w": torch.ones(2, 3)}, {"num-examples": 4.0}, "missing"),
        (
            {"w": torch.ones(2, 3)},
            {"num-examples": 4.0, "dp-weight": 1.0, "train-loss": [1.0]},
            "scalars",
        ),
    ],
)
def test_the_server_refuses_replies_it_cannot_aggregate(arrays, metrics, why):
    from flywheel.learner.federated.records import check_update

    assert why in check_update(_reply(arrays, metrics), {"w": (2, 3)})


def test_usable_replies_keep_good_ones_and_weigh_every_site_one(caplog):
    from flwr.app import Error

    from flywheel.learner.federated.server import usable_replies

    sent = {"w": np.zeros((2, 3), np.float32)}
    good = _reply({"w": torch.full((2, 3), 0.5)}, {**GOOD_METRICS, "dp-weight": -1.99})
    bad = _reply({"w": torch.full((2, 3), float("nan"))}, GOOD_METRICS)
    failed = Message(Error(code=1, reason="site budget refused"), reply_to=_message())
    refused: list[dict] = []
    with caplog.at_level(logging.WARNING):
        ok = usable_replies([good, bad, failed], sent, 2.0, refused, rnd=3)
    assert ok == [good]
    # a site's own weight could shrink the others' noise or blow up their influence
    assert ok[0].content.metric_records["metrics"]["dp-weight"] == 1.0
    assert "reply refused: array 'w' holds NaN" in caplog.text
    assert "site budget refused" in caplog.text
    assert [r["round"] for r in refused] == [3, 3]


@pytest.mark.parametrize(
    "arrays,why",
    [
        # the ×1e6 boost: finite, right shape and dtype, far over the clip norm
        ({"w": torch.full((2, 3), 1e6)}, "update norm 2.449e+06 over the clip norm 2"),
        # float64 with a 1e300 weight: finite, but not the model that was sent
        (
            {"w": torch.full((2, 3), 1e300, dtype=torch.float64)},
            "dtype float64, the model sent has float32",
        ),
        ({"w": torch.full((2, 3), 0.5, dtype=torch.float16)}, "dtype float16"),
        # just over C: √6·0.817 ≈ 2.001
        ({"w": torch.full((2, 3), 0.817)}, "over the clip norm 2"),
    ],
)
def test_the_server_bounds_every_reply_whatever_the_strategy(arrays, why, caplog):
    from flywheel.learner.federated.server import usable_replies

    sent = {"w": np.zeros((2, 3), np.float32)}
    with caplog.at_level(logging.WARNING):
        assert usable_replies([_reply(arrays, GOOD_METRICS)], sent, 2.0) == []
    assert why in caplog.text


def test_an_update_under_the_clip_norm_passes_as_sent():
    from flywheel.learner.federated.server import usable_replies

    sent = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(1, np.int64)}
    at_c = torch.full((2, 3), 1.9 / 6**0.5)  # norm 1.9
    reply = _reply({"w": at_c, "n": torch.full((1,), 5)}, GOOD_METRICS)
    assert usable_replies([reply], sent, 2.0) == [reply]  # integer buffers do not count
    assert torch.equal(torch.from_numpy(reply.content["arrays"]["w"].numpy()), at_c)


@pytest.mark.parametrize(
    "config,why",
    [
        ({"local-steps": 0}, "asked for 0 local steps"),
        ({"local-steps": -3}, "asked for -3 local steps"),
        ({"local-steps": 3000}, "this site takes 1 to 20"),
        ({"local-lr": float("nan")}, "learning rate of nan"),
        ({"local-lr": 1e9}, "learning rate"),
        ({"clip": float("nan")}, "update clip of nan"),
        ({"clip": -1.0}, "update clip"),
    ],
)
def test_a_site_refuses_round_settings_outside_its_own_limits(tmp_path, config, why):
    from flywheel.learner.federated.client_app import round_config

    with pytest.raises(ValueError, match=why):
        round_config(ConfigRecord(config), Settings(home=tmp_path).federated)


def test_a_site_takes_the_rounds_settings_within_its_limits(tmp_path):
    from flywheel.learner.federated.client_app import round_config

    config = ConfigRecord({"local-steps": 7, "local-lr": 0.05, "clip": 3.0})
    limits = Settings(home=tmp_path, fed_clip_norm=2.0).federated
    assert round_config(config, limits) == (7, 0.05, 3.0)


@pytest.mark.parametrize(
    "x,y,why",
    [
        (np.zeros((3, 4), np.float32), np.zeros(2, np.int64), "3 rows but 2 labels"),
        (np.zeros((2, 4), np.float32), np.array([0, 5]), "labels outside 0..2"),
        (np.zeros((2, 4), np.float32), np.array([0, -1]), "labels outside 0..2"),
        (np.full((2, 4), np.nan, np.float32), np.zeros(2, np.int64), "NaN or infinity"),
        (np.zeros(7, np.float32), np.zeros(2, np.int64), "byte lengths"),
    ],
)
def test_public_rows_from_the_server_are_checked(x, y, why):
    from flywheel.learner.federated.client_app import public_rows

    config = ConfigRecord({"public-x": x.tobytes(), "public-y": y.astype(np.int64).tobytes()})
    with pytest.raises(ValueError, match=why):
        public_rows(config, width=4, n_labels=3)


def test_a_bad_round_is_refused_before_the_site_reads_its_store(tmp_path):
    """Checked first: a store with no data would refuse with 'no trainable examples'."""
    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.records import to_record
    from flywheel.modelspec import ModelSpec, build_model
    from flywheel.settings import prepare_home
    from flywheel.store import upgrade

    settings = Settings(home=tmp_path)
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    spec = ModelSpec(input_dim=3, hidden=[4], labels=["a", "b"])
    state = build_model(spec).state_dict()

    def content(config, st=state):
        return RecordDict(
            {
                "arrays": to_record(st),
                "config": ConfigRecord({"model-spec": spec.model_dump_json(), **config}),
            }
        )

    site = Site.of(settings)
    with pytest.raises(ValueError, match="local steps"):
        site.train(content({"local-steps": 10_000}))
    poisoned = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in state.items()
    }
    with pytest.raises(ValueError, match="NaN or infinity"):
        site.train(content({}, poisoned))
    with pytest.raises(RuntimeError, match="no trainable examples"):
        site.train(content({}))  # the same call, well formed, gets as far as the store


def test_the_same_round_asked_twice_gets_different_noise(tmp_path):
    """The noise seed is the site's secret: a server that could replay it would recover
    the noise-free update from one reply."""
    from flywheel.learner.federated.client_app import Site
    from flywheel.learner.federated.partition import fill_site_store, make_partition
    from flywheel.learner.federated.records import to_record
    from flywheel.learner.seed_model import default_spec
    from flywheel.modelspec import build_model
    from flywheel.settings import prepare_home
    from flywheel.store import upgrade

    settings = Settings(home=tmp_path, privacy_source_updates=100)
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    x, y = make_partition(1, per_site=60, holdout=10).sites[0]
    fill_site_store(settings.resolved_database_url, x, y, site="s")
    spec = default_spec()
    content = RecordDict(
        {
            "arrays": to_record(build_model(spec).state_dict()),
            "config": ConfigRecord(
                {
                    "model-spec": spec.model_dump_json(),
                    "seed": 1,
                    "server-round": 1,
                    "local-steps": 2,
                }
            ),
        }
    )
    site = Site.of(settings)
    first, _ = site.train(content)
    second, _ = site.train(content)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_a_failing_site_is_skipped_for_a_growing_number_of_rounds():
    from flywheel.learner.federated.server import Backoff

    b = Backoff(max_rounds=4)
    asked = []
    for rnd in range(1, 16):
        nodes = b.eligible([1, 2], rnd)
        asked.append(2 in nodes)
        assert 1 in nodes  # the site that replies is asked every round
        b.update(rnd, nodes, usable={1})
    # node 2 fails whenever asked: sits out 1, 2, 4, then at most 4 rounds
    assert [r for r, a in enumerate(asked, 1) if a] == [1, 3, 6, 11]
    b.update(16, [2], usable={2})  # one usable reply clears its record
    assert b.eligible([2], 17) == [2]
    b.update(17, [2], usable=set())
    assert b.eligible([2], 18) == []  # back to a 1-round back-off
    assert Backoff(0).eligible([2], 1) == [2]


def test_a_reply_counting_fewer_examples_than_the_minimum_is_refused(caplog):
    from flywheel.learner.federated.server import usable_replies

    sent = {"w": np.zeros((2, 3), np.float32)}
    few = _reply({"w": torch.zeros(2, 3)}, {**GOOD_METRICS, "num-examples": 3.0})
    enough = _reply({"w": torch.zeros(2, 3)}, {**GOOD_METRICS, "num-examples": 10.0})
    with caplog.at_level(logging.WARNING):
        assert usable_replies([few, enough], sent, 2.0, min_examples=10) == [enough]
    assert "fewer than 10 examples" in caplog.text


def test_a_site_with_fewer_examples_than_its_minimum_refuses_the_round(tmp_path):
    from flywheel.learner.federated.client_app import Site, SiteBudgetRefused
    from flywheel.learner.federated.partition import fill_site_store, make_partition
    from flywheel.learner.federated.records import to_record
    from flywheel.learner.seed_model import default_spec
    from flywheel.modelspec import build_model
    from flywheel.settings import prepare_home
    from flywheel.store import upgrade

    settings = Settings(home=tmp_path, privacy_source_updates=100, fed_min_site_examples=50)
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    x, y = make_partition(1, per_site=30, holdout=10).sites[0]
    fill_site_store(settings.resolved_database_url, x, y, site="s")
    spec = default_spec()
    content = RecordDict(
        {
            "arrays": to_record(build_model(spec).state_dict()),
            "config": ConfigRecord({"model-spec": spec.model_dump_json(), "local-steps": 2}),
        }
    )
    with pytest.raises(SiteBudgetRefused, match="30 trainable examples .* fewer than"):
        Site.of(settings).train(content)
    # nothing was charged: the refusal comes before the ledger
    from flywheel.privacy import PrivacyLedger

    assert PrivacyLedger(Site.of(settings).engine).entries() == []


def test_an_update_a_rounding_hair_over_the_clip_ends_under_it_for_flowers_server_clip():
    """Flower's server-side clip scales every array, integer buffers too, and fails on
    them: an honest site's float32-rounded clip must not trigger it."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    from flywheel.learner.federated.server import usable_replies

    sent = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(1, np.int64)}
    over = torch.full((2, 3), 2.0 / 6**0.5 * (1 + 5e-5))  # within the slack, over C
    reply = _reply({"w": over, "n": torch.zeros(1, dtype=torch.int64)}, GOOD_METRICS)
    assert usable_replies([reply], sent, 2.0) == [reply]
    arrays = reply.content["arrays"].to_numpy_ndarrays()
    assert float(np.linalg.norm(arrays[0])) <= 2.0
    compute_clip_model_update(arrays, list(sent.values()), 2.0)  # no scaling: no error


def test_fltrust_weighs_sites_by_agreement_and_rescales_them_to_the_reference():
    from flywheel.learner.federated.fltrust import FLTrust, trust_scores

    strategy = build_strategy("fltrust", sites=3, clip=2.0, noise_multiplier=0.0)
    inner = strategy.strategy
    assert isinstance(inner, FLTrust)
    base = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(1, np.int64)}
    reference = {"w": np.full((2, 3), 0.2, np.float32), "n": np.zeros(1, np.int64)}
    inner.set_reference(base, reference)
    honest = _reply(
        {"w": torch.full((2, 3), 0.1), "n": torch.zeros(1, dtype=torch.int64)}, GOOD_METRICS
    )
    boosted = _reply(
        {"w": torch.full((2, 3), 1e5), "n": torch.zeros(1, dtype=torch.int64)}, GOOD_METRICS
    )
    flipped = _reply(
        {"w": torch.full((2, 3), -0.1), "n": torch.zeros(1, dtype=torch.int64)}, GOOD_METRICS
    )
    arrays, _ = inner.aggregate_train(1, [honest, boosted, flipped])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    # both agreeing sites count at the reference's norm, the flipped one not at all
    assert np.allclose(out["w"], 0.2, atol=1e-6)
    assert inner.last_scores == pytest.approx([1.0, 1.0, 0.0])
    assert inner.last_reference == "trusted"
    assert out["n"].dtype == np.int64
    assert trust_scores([np.zeros(3)], np.ones(3)).tolist() == [0.0]
    # sensitivity 2C over the wrapper's σC/K
    assert client_mechanism("fltrust", 1.0, 3).noise_multiplier == pytest.approx(1 / 6)


def _w(values: list[float]) -> Message:
    w = torch.tensor(values, dtype=torch.float32).reshape(2, 3)
    return _reply({"w": w, "n": torch.zeros(1, dtype=torch.int64)}, GOOD_METRICS)


def test_fltrust_with_an_uninformative_reference_scores_against_the_replies_median():
    """A trusted set the model already fits gives a reference of norm ~0.01 of the sites'
    pointing away from all of them (bench fedrobust --world drifted): scored against it,
    every site got 0 and the model never moved. It falls back to the replies' median and
    says so; the sign-flipped minority still counts for nothing."""
    from flywheel.learner.federated.fltrust import FLTrust

    inner = build_strategy("fltrust", sites=3, clip=2.0, noise_multiplier=0.0).strategy
    assert isinstance(inner, FLTrust)
    base = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(1, np.int64)}
    inner.set_reference(base, {"w": np.full((2, 3), -0.001, np.float32), "n": base["n"]})
    honest = [_w([0.1] * 6), _w([0.2, 0.1, 0.1, 0.1, 0.1, 0.1])]
    arrays, _ = inner.aggregate_train(1, [*honest, _w([-0.1] * 6)])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))["w"]
    # the honest sites' direction, at the sites' median norm (0.1·√6), never above it
    assert (out > 0.05).all()
    assert float(np.linalg.norm(out)) == pytest.approx(0.1 * 6**0.5, rel=0.02)
    assert inner.last_scores[0] > 0.9 and inner.last_scores[1] > 0.9
    assert inner.last_scores[2] == 0.0
    assert inner.last_reference == "median"
    assert inner.last_reference_ratio == pytest.approx(0.001 / 0.1, rel=1e-3)


def test_fltrust_refuses_a_round_no_site_agrees_with_an_informative_reference():
    """An informative reference (norm like the sites') that every site points away from:
    the round is refused with the cosines, not released as a round that changed nothing."""
    from flywheel.learner.federated.fltrust import FLTrust, NoAgreement

    inner = build_strategy("fltrust", sites=2, clip=2.0, noise_multiplier=0.0).strategy
    assert isinstance(inner, FLTrust)
    base = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(1, np.int64)}
    inner.set_reference(base, {"w": np.full((2, 3), 0.1, np.float32), "n": base["n"]})
    with pytest.raises(NoAgreement, match=r"trusted reference \(cosines -1.00, -1.00"):
        inner.aggregate_train(1, [_w([-0.1] * 6), _w([-0.2] * 6)])
    assert inner.last_reference == "trusted" and inner.last_scores == [0.0, 0.0]


def test_a_site_fltrust_keeps_at_zero_is_quarantined_and_a_positive_score_resets_it():
    from flywheel.learner.federated.server import Quarantine

    q = Quarantine(rounds=3)
    site = "site:{}".format
    q.update(1, {1: 0.0, 2: 0.3, 3: 0.1, 4: 0.2}, site)
    q.update(2, {1: 0.0, 2: 0.2, 3: 0.0, 4: 0.1}, site)  # 3 counts one zero
    q.update(3, {1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3}, site)  # 3 scored: its run starts over
    assert q.eligible([1, 2, 3, 4], 4) == [2, 3, 4]
    assert q.quarantined == [{"site": "site:1", "round": 3, "zero_rounds": [1, 2, 3]}]
    for rnd in (4, 5, 6):  # 3 keeps scoring 0 while 2 and 4 agree; 1 is named once only
        q.update(rnd, {2: 0.1, 3: 0.0, 4: 0.2}, site)
    assert q.eligible([1, 2, 3, 4], 7) == [2, 4]
    assert [x["site"] for x in q.quarantined] == ["site:1", "site:3"]


def test_rounds_where_most_sites_score_zero_count_against_nobody():
    """Measured (bench fedrobust --world same, seed 7, server step and momentum 0.5, 4
    honest sites): rounds scored (0, 0, 0, 0.03) and (0.01, 0, 0, 0) three times in a row
    quarantined 2 of the 4 honest sites when every zero counted. Such a round says the
    reference disagreed with the federation: it neither counts nor resets a run."""
    from flywheel.learner.federated.server import Quarantine

    q = Quarantine(rounds=2)
    site = "site:{}".format
    q.update(1, {1: 0.0, 2: 0.2, 3: 0.1, 4: 0.3}, site)  # 1: one zero while others agree
    for rnd in (2, 3, 4):
        q.update(rnd, {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.03}, site)  # half or more at 0
    q.update(5, {1: 0.0, 2: 0.0, 3: 0.1, 4: 0.0}, site)
    assert q.eligible([1, 2, 3, 4], 6) == [1, 2, 3, 4] and not q.quarantined
    q.update(6, {1: 0.0, 2: 0.1, 3: 0.2, 4: 0.0}, site)  # 2 of 3 others agree: counts
    assert q.quarantined == [{"site": "site:1", "round": 6, "zero_rounds": [1, 6]}]


def test_quarantine_off():
    from flywheel.learner.federated.server import Quarantine

    site = "site:{}".format
    never = Quarantine(rounds=0)
    for rnd in range(1, 10):
        never.update(rnd, {1: 0.0}, site)
    assert never.eligible([1], 10) == [1] and not never.quarantined
