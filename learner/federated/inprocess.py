"""A Grid that runs each site's ClientApp in this process: same messages, no transport.

For the benchmarks' accuracy comparisons and fast tests of the round logic; the real
deployment (and the integration tests) go through Flower's SuperLink and SuperNodes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from flywheel.learner.federated import client_app
from flywheel.learner.federated.client_app import Site


class InProcessGrid(Grid):
    """Node ids 1..K mapped to sites; `apps` may give a node another ClientApp."""

    def __init__(self, sites: list[Site], apps: dict[int, ClientApp] | None = None) -> None:
        self.sites = {i + 1: site for i, site in enumerate(sites)}
        self.apps = apps or {}
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None
        client_app._in_process.update(self.sites)
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, 0

    def close(self) -> None:
        for node in self.sites:
            client_app._in_process.pop(node, None)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            context = Context(
                run_id=0, node_id=node, node_config={}, state=RecordDict(), run_config={}
            )
            app = self.apps.get(node, client_app.app)
            self._replies[msg.metadata.message_id] = app(message=msg, context=context)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
