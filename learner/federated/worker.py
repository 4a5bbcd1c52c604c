"""A long-lived ClientApp process: the round-latency fix for the customer side.

Flower 1.41's SuperNode starts a new `flwr-clientapp` process for every message
(`--isolation subprocess`): each round pays a Python, torch and Flywheel import (~2–5 s)
plus the SuperExec's 1 s task poll. With `--isolation process` the SuperNode leaves task
execution to an outside process; this is that process. It imports everything once, asks
the SuperNode's Runtime API for a task every `FLYWHEEL_FED_POLL_S`, and runs each task
exactly as `flwr-clientapp` would (pull the message and context, call the ClientApp, push
the reply and the task's final status), with the app already loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

log = logging.getLogger(__name__)


def _retry(stop: threading.Event | None) -> RetryInvoker:
    """Flower's HTTP retry (as `flwr-clientapp`), giving up once `stop` is set: when the
    SuperNode has exited, nothing will ever answer."""
    retry = make_simple_http_retry_invoker()
    if stop is not None:
        giveup = retry.should_giveup
        retry.should_giveup = lambda exc: stop.is_set() or bool(giveup and giveup(exc))
        wait = retry.wait_function
        retry.wait_function = lambda seconds: None if stop.is_set() else wait(seconds)
    return retry


def _client(
    address: str, token: str | None = None, *, retry: RetryInvoker | None = None
) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API: plain HTTP, which `supernode_command`
    binds to 127.0.0.1 only (the Fleet connection to the SuperLink is the TLS one)."""
    interceptors: list[RuntimeVersionHttpInterceptor | RuntimeTokenHttpInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def run_task(address: str, token: str, app: ClientApp, stop: threading.Event | None = None) -> str:
    """One task, as `flwr-clientapp` runs it; returns its final sub-status."""
    client = _client(address, token, retry=_retry(stop))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the server gets an error reply, as from flwr-clientapp
        log.exception("ClientApp raised")
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:
                heartbeat.stop()
                client.close()
    return status


def serve(
    address: str,
    app: ClientApp,
    *,
    poll_s: float,
    stop: threading.Event | None = None,
    after_task: Callable[[], None] | None = None,
) -> None:
    """Run tasks from the SuperNode at `address` (host:port) until `stop` is set;
    `after_task` runs in a background thread after each task (accounting pre-warm)."""
    stop = stop or threading.Event()
    # no retry inside the poll: this loop retries, and it must see `stop` (a SuperNode
    # refused by the SuperLink exits, and Flower's retry would wait for it forever)
    acquire = _client(address)
    log.info("long-lived ClientApp: polling %s every %.3g s", address, poll_s)
    try:
        while not stop.is_set():
            try:
                res = acquire.AcquireTask(
                    AcquireTaskRequest(
                        supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]
                    )
                )
            except Exception as exc:  # SuperNode not up yet, or restarting
                log.debug("no SuperNode at %s yet: %s", address, exc)
                stop.wait(max(poll_s, 0.5))
                continue
            if res.HasField("task") and res.token:
                started = time.perf_counter()
                try:
                    status = run_task(address, res.token, app, stop)
                except Exception:
                    if not stop.is_set():
                        raise
                    log.warning("the SuperNode went away during task %s", res.task.task_id)
                    break
                log.info(
                    "task %s %s in %.2f s", res.task.task_id, status, time.perf_counter() - started
                )
                if after_task is not None:
                    threading.Thread(target=after_task, daemon=True).start()
                continue
            stop.wait(poll_s)
    finally:
        acquire.close()
