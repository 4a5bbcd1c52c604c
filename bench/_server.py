"""One benchmark server: the real app on one uvicorn worker, with Kafka logging on or off.

Both modes build the app with the same `create_app` and the same saved weights; only
the event log differs, so any gap between them is the cost of logging.

`--durability fast` answers as the service did before issue 27: a correction (and a
prediction) once its records are on the event log's in-memory queue, not once Kafka
acknowledged them or the spool holds them (`durable`, the service's own behaviour). It
is the baseline of `bench serve --compare corrections|predictions`.

`--vectors` serves a model that has a feature schema as if it had none: the same module
and weights (its `Encode` layer included), so `POST /v1/predict` takes the raw vectors
the schema encodes named rows to, pre-encoded by the client. It is the baseline of
`bench serve --compare named`: the same forward pass, without named rows.

`--live ROLE` (repeatable: shadow, canary, guard) serves, beside the champion, a variant
of the same module (its weights moved by seeded noise, so it answers differently) in each
role, at the default shares (FLYWHEEL_LIVE_*_SHARE), its scores logged to
`--scores-topic`. It is the measured side of `bench serve --compare shadow`; the canary
bench can use `--live canary` the same way.

    python -m bench._server --model DIR --port P --logging on|off --bootstrap H:P --home DIR
        [--durability fast|durable] [--corrections-topic T] [--live ROLE ...]
        [--scores-topic T]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from flywheel.service.event_log import EventLog
    from flywheel.service.spool import Record

MODEL_NAME = "bench"
MODEL_VERSION = "1"


class DiscardEventLog:
    """Duck-types `EventLog` for logging off: records are discarded in the request path,
    with no queue, no sender thread and no producer."""

    running = True
    connected = True
    queue_depth = 0

    def __init__(self) -> None:
        from flywheel.service.event_log import EventLogStats

        self.spool = SimpleNamespace(pending=0, pending_bytes=0)
        self.stats = EventLogStats()

    def log(self, topic: str, key: str, value: bytes) -> None:
        pass

    def log_many(self, records: list[Record]) -> None:
        pass

    def log_durable(self, records: list[Record]) -> Future[None]:
        """Already 'stored': discarded, as `log_many` does."""
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def log_durable_async(self, records: list[Record]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def start(self) -> DiscardEventLog:
        return self

    def close(self, timeout_s: float | None = None) -> None:
        pass


class QueuedOnlyEventLog:
    """Wraps the real `EventLog` and answers a durable request once its records are
    queued (the fast, pre-issue-27 behaviour), not once they are acknowledged or spooled;
    everything else is the wrapped log's."""

    def __init__(self, inner: EventLog) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def log_durable(self, records: list[Record]) -> Future[None]:
        self.inner.log_many(records)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def log_durable_async(self, records: list[Record]) -> asyncio.Future[None]:
        self.inner.log_many(records)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def build_app(
    model_dir: Path,
    logging_on: bool,
    home: Path,
    bootstrap: str | None,
    topic: str | None,
    vectors: bool = False,
    durability: str = "durable",
    corrections_topic: str | None = None,
    live: tuple[str, ...] = (),
    scores_topic: str | None = None,
):
    """The app exactly as production wires it, but with a model from a local folder (and
    a variant of it in each `live` role)."""
    from flywheel.artifacts import load_model
    from flywheel.service import (
        ModelHolder,
        ServedModel,
        ServedSet,
        ServiceConfig,
        create_app,
        kafka_event_log,
    )
    from flywheel.settings import Settings, prepare_home

    overrides: dict[str, object] = {"home": home, "kafka_bootstrap": bootstrap}
    if topic:
        overrides["topic_predictions"] = topic
    if corrections_topic:
        overrides["topic_corrections"] = corrections_topic
    if scores_topic:
        overrides["topic_scores"] = scores_topic
    overrides["prediction_durability"] = durability
    settings = Settings(**overrides)  # type: ignore[arg-type]
    prepare_home(settings)
    spec, module = load_model(model_dir)
    if vectors:  # the same module; the service sees no schema, so it takes raw vectors
        spec = spec.model_copy(update={"schema_": None})
    holder = ModelHolder()
    champion = ServedModel.prepare(MODEL_NAME, MODEL_VERSION, spec, module)
    roles = {
        role: ServedModel.prepare(MODEL_NAME, str(i), spec, _variant(module, seed=i))
        for i, role in enumerate(live, start=2)
    }
    holder.swap_set(ServedSet(champion, **roles))
    event_log = (
        kafka_event_log(settings.kafka, settings.event_log, settings.state)
        if logging_on
        else cast("EventLog", DiscardEventLog())
    )
    if logging_on and durability == "fast":
        event_log = cast("EventLog", QueuedOnlyEventLog(event_log))
    return create_app(ServiceConfig.of(settings), holder=holder, event_log=event_log)


def _variant(module, seed: int):
    """A copy of `module` with every weight moved by seeded noise (another version)."""
    import copy

    import torch

    out = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench._server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="folder written by save_model")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--logging", choices=("on", "off"), required=True)
    p.add_argument("--bootstrap", help="Kafka host:port (required with --logging on)")
    p.add_argument("--home", type=Path, required=True, help="this server's state folder")
    p.add_argument("--topic", help="predictions topic (default: the settings default)")
    p.add_argument(
        "--vectors",
        action="store_true",
        help="serve the model without its feature schema: raw vectors in, not named rows",
    )
    p.add_argument(
        "--durability",
        choices=("fast", "durable"),
        default="durable",
        help="durable: answer once Kafka acknowledged or the spool holds the records "
        "(the service); fast: once they are queued (the behaviour before issue 27)",
    )
    p.add_argument("--corrections-topic", help="corrections topic (default: the settings')")
    p.add_argument(
        "--live",
        action="append",
        choices=("shadow", "canary", "guard"),
        default=[],
        help="also serve a variant of the model in this role (repeatable)",
    )
    p.add_argument("--scores-topic", help="scores topic (default: the settings')")
    args = p.parse_args(argv)
    if args.logging == "on" and not args.bootstrap:
        p.error("--logging on needs --bootstrap")

    import uvicorn

    app = build_app(
        args.model,
        args.logging == "on",
        args.home,
        args.bootstrap,
        args.topic,
        args.vectors,
        args.durability,
        args.corrections_topic,
        tuple(args.live),
        args.scores_topic,
    )
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, workers=1, access_log=False, log_level="warning"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
