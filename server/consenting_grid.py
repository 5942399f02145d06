"""A view of a Flower Grid that hides the nodes of withdrawn clients.

Flower's strategies sample from ``grid.get_node_ids()``; filtering there, rather
than after sampling, keeps sample sizes right and guarantees a withdrawn
client receives no instruction of any kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedforget.server.client_identity import ClientIdResolver


class ConsentingGrid(Grid):
    """Delegate to ``grid``, listing only nodes whose client may still take part."""

    def __init__(
        self, grid: Grid, identities: ClientIdResolver, is_excluded: Callable[[str], bool]
    ) -> None:
        self._grid = grid
        self._identities = identities
        self._is_excluded = is_excluded

    def get_node_ids(self) -> Iterable[int]:
        node_ids = list(self._grid.get_node_ids())
        clients = self._identities.resolve(self._grid, node_ids)
        return [node for node in node_ids if not self._is_excluded(clients[node])]

    def get_nodes(self):  # type: ignore[no-untyped-def]
        allowed = set(self.get_node_ids())
        return [info for info in self._grid.get_nodes() if info.node_id in allowed]

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(  # pylint: disable=too-many-arguments
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
