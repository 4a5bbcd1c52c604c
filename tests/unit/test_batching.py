"""Dynamic batching: the generic micro-batcher, and concurrent clients through the app."""

import asyncio
import time

import httpx
import numpy as np
import pytest
import torch

from flywheel.events import PredictionEvent
from flywheel.kernels.batching import MicroBatcher
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.service.batching import PredictBatcher, run_batch
from flywheel.settings import ServiceSettings, Settings


class Recorder:
    """A `run` that records its calls and doubles each item (or fails on "bad")."""

    def __init__(self):
        self.calls = []

    def __call__(self, items):
        self.calls.append(list(items))
        if any(i == "bad" for i in items):
            raise ValueError("bad item")
        return [i * 2 for i in items]


async def gather(batcher, items):
    return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)


def test_concurrent_submits_share_one_call_in_order():
    run = Recorder()
    batcher = MicroBatcher(run, max_size=64, max_wait_s=0.0)
    out = asyncio.run(gather(batcher, list(range(10))))
    assert out == [i * 2 for i in range(10)]
    assert run.calls == [list(range(10))]
    assert (batcher.stats.batches, batcher.stats.items, batcher.stats.largest) == (1, 10, 10)


def test_max_size_counts_rows_and_an_oversized_item_runs_alone():
    run = Recorder()
    batcher = MicroBatcher(run, max_size=4, max_wait_s=0.0, size=lambda s: len(s))
    items = ["a", "b", "c", "d", "e", "ffffff", "g", "hh", "i"]
    out = asyncio.run(gather(batcher, items))
    assert out == [s * 2 for s in items]
    assert run.calls == [["a", "b", "c", "d"], ["e"], ["ffffff"], ["g", "hh", "i"]]
    assert all(sum(map(len, c)) <= 4 or len(c) == 1 for c in run.calls)


def test_a_lone_client_never_waits():
    run = Recorder()
    batcher = MicroBatcher(run, max_size=64, max_wait_s=1.0)

    async def sequential():
        t0 = time.perf_counter()
        for i in range(20):
            assert await batcher.submit(i) == 2 * i
        return time.perf_counter() - t0

    assert asyncio.run(sequential()) < 0.5  # 20 waits of 1 s would be 20 s
    assert batcher.stats.waits == 0 and len(run.calls) == 20


def test_a_lone_client_skips_even_the_yield_but_company_is_noticed():
    run = Recorder()
    batcher = MicroBatcher(run, max_size=64, max_wait_s=0.0, probe_every=4)

    async def scenario():
        for i in range(6):  # 0: probes, alone; 1-3: at once; 4: probes again; 5: at once
            assert await batcher.submit(i) == 2 * i
        return await gather(batcher, list(range(10, 20)))

    out = asyncio.run(scenario())
    assert out == [2 * i for i in range(10, 20)]
    # two more run at once before the next probe finds the other eight
    assert run.calls == [[i] for i in range(6)] + [[10], [11], list(range(12, 20))]
    assert batcher.expected_rows() == 8


def test_under_load_a_batch_waits_for_more_but_at_most_max_wait():
    async def scenario(max_wait_s):
        run = Recorder()
        batcher = MicroBatcher(run, max_size=64, max_wait_s=max_wait_s)
        await gather(batcher, [1, 2, 3, 4])  # recent batches held 4: expect company

        async def late(i, delay):
            await asyncio.sleep(delay)
            return await batcher.submit(i)

        t0 = time.perf_counter()
        out = await asyncio.gather(batcher.submit(10), late(11, 0.02), late(12, 0.04))
        return run.calls[1:], out, time.perf_counter() - t0

    calls, out, _ = asyncio.run(scenario(0.3))
    assert out == [20, 22, 24]
    assert calls == [[10, 11, 12]]  # waited for the late ones (fewer than the expected 4)
    calls, out, elapsed = asyncio.run(scenario(0.01))
    assert out == [20, 22, 24]
    assert calls[0] == [10]  # gave up after 10 ms
    assert elapsed < 0.5


def test_a_full_batch_does_not_wait():
    async def scenario():
        run = Recorder()
        batcher = MicroBatcher(run, max_size=3, max_wait_s=5.0)
        await gather(batcher, [1, 2, 3])
        t0 = time.perf_counter()
        await gather(batcher, [4, 5, 6])
        return time.perf_counter() - t0, run.calls

    elapsed, calls = asyncio.run(scenario())
    assert elapsed < 1.0 and calls == [[1, 2, 3], [4, 5, 6]]


def test_one_failing_item_never_fails_the_others():
    run = Recorder()
    batcher = MicroBatcher(run, max_size=64, max_wait_s=0.0)
    out = asyncio.run(gather(batcher, [1, "bad", 3]))
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], ValueError)
    assert batcher.stats.isolated == 1
    assert run.calls[0] == [1, "bad", 3] and run.calls[1:] == [[1], ["bad"], [3]]


def test_items_with_different_keys_never_share_a_call():
    calls = []

    def run(items):
        calls.append(items)
        assert len({v for v, _ in items}) == 1
        return [(v, x * 10) for v, x in items]

    batcher = MicroBatcher(run, max_size=64, max_wait_s=0.0, key=lambda item: item[0])
    items = [("v1", 1), ("v2", 2), ("v1", 3), ("v2", 4)]
    out = asyncio.run(gather(batcher, items))
    assert out == [("v1", 10), ("v2", 20), ("v1", 30), ("v2", 40)]
    assert calls == [[("v1", 1), ("v1", 3)], [("v2", 2), ("v2", 4)]]


def test_cancelled_callers_are_skipped_and_the_rest_still_answered():
    async def scenario():
        run = Recorder()
        batcher = MicroBatcher(run, max_size=64, max_wait_s=0.0)
        leader = asyncio.ensure_future(batcher.submit(1))
        follower = asyncio.ensure_future(batcher.submit(2))
        other = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)  # all three queued; the leader yields once
        follower.cancel()
        leader.cancel()
        results = await asyncio.gather(leader, follower, other, return_exceptions=True)
        return results, run.calls

    results, calls = asyncio.run(scenario())
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] == 6 and calls == [[3]]


# -- the service's batch function ------------------------------------------------------
SPEC = ModelSpec(input_dim=3, hidden=[8], labels=["cat", "dog"])


def served(version: str, seed: int) -> ServedModel:
    torch.manual_seed(seed)
    return ServedModel.prepare("m", version, SPEC, build_model(SPEC))


def test_run_batch_returns_each_request_its_rows():
    model = served("1", 0)
    xs = [np.random.default_rng(i).normal(size=(i + 1, 3)).astype(np.float32) for i in range(4)]
    out = run_batch([(model, x) for x in xs])
    for x, (probs, paths) in zip(xs, out, strict=True):
        np.testing.assert_allclose(probs, model.predict_proba(x), rtol=1e-5, atol=1e-6)
        assert paths == ["single"] * len(x)


def test_each_request_is_computed_by_the_snapshot_it_took():
    v1, v2 = served("1", 0), served("2", 1)
    batcher = PredictBatcher(ServiceSettings(batch_max_wait_ms=0))
    x = np.ones((1, 3), np.float32)

    async def scenario():
        return await asyncio.gather(
            batcher.predict(v1, x), batcher.predict(v2, x), batcher.predict(v1, x)
        )

    out = asyncio.run(scenario())
    np.testing.assert_allclose(out[0][0], v1.predict_proba(x), rtol=1e-6)
    np.testing.assert_allclose(out[1][0], v2.predict_proba(x), rtol=1e-6)
    assert not np.allclose(out[0][0], out[1][0])
    assert batcher.stats.batches == 2  # one forward pass per snapshot


# -- through the app -------------------------------------------------------------------


async def _concurrent_clients(app, bodies, headers):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))


@pytest.mark.parametrize("dynamic", [True, False])
def test_concurrent_clients_get_their_own_rows_ids_and_version(
    tmp_path, dynamic, list_event_log, app_key
):
    model = served("7", 0)
    holder = ModelHolder()
    holder.swap(model)
    sent = []
    log = list_event_log(sent)
    settings = Settings(home=tmp_path, dynamic_batching=dynamic, batch_max_size=16)
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=log)
    rng = np.random.default_rng(3)
    bodies = [{"instances": rng.normal(size=(1 + i % 3, 3)).round(3).tolist()} for i in range(40)]
    bodies[5] = {"instances": [[1.0, 2.0]]}  # wrong width: refused, alone
    responses = asyncio.run(_concurrent_clients(app, bodies, app_key.headers))
    assert responses[5].status_code == 422 and "expects 3" in responses[5].json()["detail"]
    ids = []
    for i, (body, r) in enumerate(zip(bodies, responses, strict=True)):
        if i == 5:
            continue
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model"] == {"name": "m", "version": "7"}
        probs = np.asarray(
            [[p["probabilities"][k] for k in SPEC.labels] for p in doc["predictions"]]
        )
        expected = model.predict_proba(np.asarray(body["instances"], np.float32))
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
        ids += [p["id"] for p in doc["predictions"]]
    assert len(ids) == len(set(ids)) == sum(len(b["instances"]) for b in bodies) - 1
    assert log.wait_idle(5)
    events = {e.id: e for e in (PredictionEvent.model_validate_json(r.value) for r in sent)}
    assert set(events) == set(ids)
    assert {e.path for e in events.values()} == {"single"}
    assert {e.model_version for e in events.values()} == {"7"}
    batcher = app.state.service.batcher
    if dynamic:
        assert batcher.stats.items == 39 and batcher.stats.batches < 39
        assert 1 < batcher.stats.largest <= 16
    else:
        assert batcher is None


def test_batch_metrics_are_exported(tmp_path, list_event_log, app_key):
    holder = ModelHolder()
    holder.swap(served("7", 0))
    log = list_event_log()
    app = create_app(ServiceConfig.of(Settings(home=tmp_path)), holder=holder, event_log=log)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", headers=app_key.headers
            ) as c:
                await asyncio.gather(
                    *(c.post("/v1/predict", json={"instances": [[1, 2, 3]]}) for _ in range(5))
                )
                return (await c.get("/metrics")).text

    text = asyncio.run(scenario())
    assert "flywheel_batched_requests_total 5.0" in text
