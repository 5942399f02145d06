"""An in-process Flower Grid for fast tests of the Flower layer.

It hands each message straight to a real ClientApp with a per-node Context,
turning exceptions into error replies as Flower's runtimes do, and lists its
nodes as Flower 1.42 does: a simulated node has no name, a 32-byte random key
and an infinite heartbeat interval, and the i-th registered holds partition i;
a deployed node has a finite heartbeat and, if registered with one, a name.
Node ids are handed out in the reverse of registration order, so that nothing
can pass by sorting node ids. The simulation engine (Ray) is exercised
separately by the end-to-end tests; this grid keeps the many unit tests of the
Flower layer fast.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF
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
    """``num_nodes`` nodes each running ``app`` in this process.

    Node ``node_ids[i]`` is the i-th registered: simulated, it has node config
    ``partition-id = i`` (``node_config(i)`` replaces that); ``names`` (by
    registration index) makes the named ones deployed nodes, and ``deployed``
    makes every node a deployed one (unnamed unless named).
    """

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        node_config: Callable[[int], dict[str, object]] | None = None,
        names: dict[int, str] | None = None,
        *,
        deployed: bool = False,
    ) -> None:
        self.app = app
        self.node_ids = [num_nodes - i for i in range(num_nodes)]
        self.names = {self.node_ids[i]: name for i, name in (names or {}).items()}
        self.deployed = deployed or bool(names)
        registered = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
        self.registered_at = {
            node: (registered + dt.timedelta(microseconds=37 * i)).isoformat() for i, node in enumerate(self.node_ids)
        }
        self.keys = {node: hashlib.sha256(f"key-{node}".encode()).digest() for node in self.node_ids}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=(node_config or (lambda i: {"partition-id": i}))(index),  # type: ignore[arg-type]
                state=RecordDict(),
                run_config={},
            )
            for index, node_id in enumerate(self.node_ids)
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

    def node_of(self, index: int) -> int:
        """The node id of the ``index``-th registered node (partition ``index`` in a simulation)."""
        return self.node_ids[index]

    def get_node_ids(self) -> Iterable[int]:
        return sorted(n for n in self.contexts if n not in self.offline)

    def get_nodes(self) -> Iterable[NodeInfo]:
        nodes = []
        for n in self.get_node_ids():
            info = NodeInfo(
                node_id=n,
                registered_at=self.registered_at[n],
                public_key=self.keys[n],
                heartbeat_interval=30.0 if self.deployed else HEARTBEAT_INTERVAL_INF,
            )
            if n in self.names:
                info.name = self.names[n]
            nodes.append(info)
        return nodes

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
