"""Views of a Flower Grid: one hides the nodes of withdrawn clients, one collects replies promptly.

Flower's strategies sample from ``grid.get_node_ids()``; filtering there, rather
than after sampling, keeps sample sizes right and guarantees a withdrawn
client receives no instruction of any kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedforget.server.rounds.client_identity import ClientIdResolver


class DelegatingGrid(Grid):
    """A Grid that hands every call to ``grid``; subclasses change what they must."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self._grid.get_nodes()

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


class ConsentingGrid(DelegatingGrid):
    """Delegate to ``grid``, listing only nodes whose client may still take part, in client-id order.

    The order matters when Flower samples a fraction of the nodes: its
    ``random.sample`` picks by position, and Flower's node ids are random per
    simulation run, so only a list ordered by client id lets a seeded draw
    pick the same clients in every run.
    """

    def __init__(
        self, grid: Grid, identities: ClientIdResolver, is_excluded: Callable[[str], bool]
    ) -> None:
        super().__init__(grid)
        self._identities = identities
        self._is_excluded = is_excluded

    def get_node_ids(self) -> Iterable[int]:
        node_ids = list(self._grid.get_node_ids())
        clients = self._identities.resolve(self._grid, node_ids)
        allowed = [node for node in node_ids if not self._is_excluded(clients[node])]
        return sorted(allowed, key=lambda node: _client_order(clients[node]))

    def get_nodes(self):  # type: ignore[no-untyped-def]
        allowed = set(self.get_node_ids())
        return [info for info in self._grid.get_nodes() if info.node_id in allowed]


def _client_order(client_id: str) -> tuple[int, int, str]:
    """Numeric ids (simulated partitions) in numeric order, then the others by name: a total, stable order."""
    return (0, int(client_id), client_id) if client_id.isdigit() else (1, 0, client_id)


class PromptGrid(DelegatingGrid):
    """Collect replies every ``poll_interval`` seconds instead of Flower's deployment default of 3 s.

    Flower 1.42's deployed Grid sleeps 3 s between pulls, so a round whose last
    reply lands just after a pull waits up to 3 s for nothing; the ServerApp is
    the project's to tune, the SuperNodes' polling is not.
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.2) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        super().__init__(grid)
        self.poll_interval = poll_interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {msg.metadata.reply_to_message_id for msg in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies


class ShardGrid(DelegatingGrid):
    """Delegate to ``grid``, listing only the nodes of one shard's clients (a sharded federation).

    Every strategy samples from ``get_node_ids()``, so the shard's rounds,
    replays and unlearnings never reach another shard's clients. ``get_nodes()``
    still lists every node: a simulated node's client id is its rank among
    *all* registered nodes, so identities must be resolved over the full list.
    """

    def __init__(self, grid: Grid, identities: ClientIdResolver, clients: Iterable[str]) -> None:
        super().__init__(grid)
        self._identities = identities
        self.clients = frozenset(clients)

    def get_node_ids(self) -> Iterable[int]:
        node_ids = list(self._grid.get_node_ids())
        clients = self._identities.resolve(self._grid, node_ids)
        return [node for node in node_ids if clients[node] in self.clients]
