"""An in-process Flower Grid for fast tests of the Flower layer.

It hands each message straight to a real ClientApp with a per-node Context,
turning exceptions into error replies as Flower's runtimes do. The simulation
engine (Ray) is exercised separately by the end-to-end tests; this grid keeps
the many unit tests of the Flower layer fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.supercore.task_identity import TaskIdentity

# Flower stamps messages with the identity of the task that creates them.
TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0


class LocalGrid(Grid):
    """Nodes ``1..n`` each running ``app`` in this process; ``node_config(i)`` configures node ``i``."""

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        node_config: Callable[[int], dict[str, object]] | None = None,
        names: dict[int, str] | None = None,
    ) -> None:
        self.app = app
        self.names = names or {}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=(node_config or (lambda i: {"partition-id": i - 1}))(node_id),  # type: ignore[arg-type]
                state=RecordDict(),
                run_config={},
            )
            for node_id in range(1, num_nodes + 1)
        }
        self.sent: list[Message] = []
        self.offline: set[int] = set()

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used by the tests
        raise NotImplementedError

    @property
    def run(self) -> Run:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if node_id in self.offline:
                continue
            try:
                reply = self.app(message, self.contexts[node_id])
            except Exception as exc:  # noqa: BLE001 - the runtime reports any failure as an error reply
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node_id
            replies.append(reply)
        return replies
