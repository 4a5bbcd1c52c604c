"""The serve benchmark keeps working (figures are not asserted: they belong to docs)."""

from __future__ import annotations

import pytest

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_serve_runs_both_modes_and_verifies_logging(run_bench_process):
    doc = run_bench_process(
        "serve", "--duration", "1", "--warmup", "0.5", "--rounds", "1", "--concurrency", "4"
    )
    assert [run["mode"] for run in doc["runs"]] == ["off", "on"]
    summary = doc["summary"]
    on = [
        {
            k: run[k]
            for k in ("log_stats", "drain_s", "backlog_at_end", "events_logged", "events_unique")
        }
        | {"ok_total": run["load"]["ok_total"]}
        for run in doc["runs"]
        if run["mode"] == "on"
    ]
    assert summary["median"]["on"]["errors"] == summary["median"]["off"]["errors"] == 0, on
    assert summary["events_match"] and summary["events_logged"] > 0, (summary, on)
    assert summary["throughput_ratio"] > 0 and summary["p99_ratio"] > 0


def test_bench_serve_compares_named_rows_with_vectors_on_one_model(run_bench_process):
    doc = run_bench_process(
        "serve",
        "--compare",
        "named",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rounds",
        "1",
        "--concurrency",
        "4",
    )
    assert [run["mode"] for run in doc["runs"]] == ["vector", "named"]
    assert doc["config"]["model"]["family"] == "embed_mlp"
    summary = doc["summary"]
    assert summary["median"]["named"]["errors"] == summary["median"]["vector"]["errors"] == 0
    assert summary["median"]["named"]["non_200"] == summary["median"]["vector"]["non_200"] == 0
    # every served id on the topic, and only the named requests' events carry a row
    assert summary["events_match"] and summary["events_rows_match"], summary
    named = next(run for run in doc["runs"] if run["mode"] == "named")
    assert named["events_with_row"] == named["events_logged"] > 0
    assert summary["throughput_ratio"] > 0 and summary["p99_ratio"] > 0


@pytest.mark.parametrize("compare", ["corrections", "predictions"])
def test_bench_serve_compares_durable_answers_with_queued_ones(compare, run_bench_process):
    """Issue 27: the same endpoint answered once its records are durable (the service)
    and once they are queued (before); every 2xx call's record is read back."""
    doc = run_bench_process(
        "serve",
        "--compare",
        compare,
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rounds",
        "1",
        "--concurrency",
        "4",
    )
    assert [run["mode"] for run in doc["runs"]] == ["fast", "durable"]
    summary = doc["summary"]
    for mode in ("fast", "durable"):
        assert summary["median"][mode]["errors"] == summary["median"][mode]["non_200"] == 0
    assert summary["events_match"] and summary["events_logged"] > 0, summary
    durable = next(run for run in doc["runs"] if run["mode"] == "durable")
    assert durable["log_stats"]["batches"] > 0  # answered through the sender's batches
    topic = "bench.corrections" if compare == "corrections" else "bench.predictions"
    assert all(run["topic"].startswith(topic) for run in doc["runs"])
    assert summary["throughput_ratio"] > 0


@pytest.mark.parametrize(
    ("compare", "modes"),
    [
        # app keys on and off: every keyed request is answered 200 (a refused key would be
        # a non-200 and a figure about 401s), and the open side sent no key
        ("auth", ("open", "keys")),
        # keys on both sides, the limited side's bucket never empties (every request 200:
        # a 429 would be a non-200), and the app's refusals stay at 0
        ("ratelimit", ("keys", "limited")),
    ],
)
def test_bench_serve_compares_two_access_modes(run_bench_process, compare, modes):
    """`--compare auth` and `--compare ratelimit`: both sides answered without an error or
    a non-200, side by side in one run, with their two ratios."""
    doc = run_bench_process(
        "serve",
        "--compare",
        compare,
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rounds",
        "1",
        "--concurrency",
        "4",
    )
    assert [run["mode"] for run in doc["runs"]] == list(modes)
    summary = doc["summary"]
    assert summary["compare"] == compare
    for mode in modes:
        assert summary["median"][mode]["errors"] == summary["median"][mode]["non_200"] == 0
    assert all(run["load"]["ok_total"] > 0 for run in doc["runs"])
    assert summary["throughput_ratio"] > 0 and summary["p99_ratio"] > 0
    if compare == "auth":
        assert all(run["topic"] is None for run in doc["runs"])
        assert set(summary["targets"]) == {"throughput_ratio", "p99_ratio"}
