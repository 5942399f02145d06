"""Map Flower node ids to the stable client ids the history is keyed by.

Node ids are random per simulation run and say nothing about who an
organisation is, so history keyed by them could never be unlearned later. In a
deployment the SuperLink knows each node's registered name, which is the
authority. In simulation nodes have no name; the ClientApp then answers a
``query.identity`` message with its partition id.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import getLogger

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedforget import wire
from fedforget.server.store.errors import FedforgetError

_log = getLogger(__name__)


class ClientIdentityError(FedforgetError):
    """A node's stable client id could not be established."""


class ClientIdResolver:
    """Resolve and remember node id → client id for the nodes of one run."""

    def __init__(self, *, timeout: float = 120.0) -> None:
        self._timeout = timeout
        self._client_of_node: dict[int, str] = {}

    def client_id(self, node_id: int) -> str:
        """The client id of a node already resolved by :meth:`resolve`."""
        try:
            return self._client_of_node[node_id]
        except KeyError:
            raise ClientIdentityError(
                f"node {node_id} has not been identified; call resolve() with the grid first"
            ) from None

    def known(self) -> dict[int, str]:
        """All resolved nodes."""
        return dict(self._client_of_node)

    def resolve(self, grid: Grid, node_ids: Iterable[int]) -> dict[int, str]:
        """Identify ``node_ids`` (cached), by registered name first, else by asking the node."""
        wanted = [n for n in node_ids if n not in self._client_of_node]
        if wanted:
            names = {info.node_id: info.name for info in grid.get_nodes() if info.node_id in wanted}
            unnamed = [n for n in wanted if not names.get(n)]
            found = {n: name for n, name in names.items() if name}
            found.update(self._query(grid, unnamed))
            self._admit(found)
        return {n: self._client_of_node[n] for n in node_ids}

    def _query(self, grid: Grid, node_ids: list[int]) -> dict[int, str]:
        if not node_ids:
            return {}
        messages = [
            Message(content=RecordDict(), message_type=wire.IDENTITY_QUERY, dst_node_id=node_id)
            for node_id in node_ids
        ]
        answered: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self._timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                raise ClientIdentityError(
                    f"node {node_id} has no registered name and could not answer the identity "
                    f"query ({reply.error.reason}). Register deployment nodes with "
                    "`flwr supernode register KEY.pub CONNECTION --name NAME`, or build the "
                    "ClientApp with fedforget.client.make_client_app, which answers it."
                )
            record = reply.content.config_records.get(wire.IDENTITY_KEY)
            client_id = None if record is None else record.get(wire.CLIENT_ID)
            if not isinstance(client_id, str) or not client_id:
                raise ClientIdentityError(f"node {node_id} answered the identity query without a client id")
            answered[node_id] = client_id
        missing = sorted(set(node_ids) - set(answered))
        if missing:
            raise ClientIdentityError(
                f"nodes {missing} did not answer the identity query within {self._timeout:.0f} s"
            )
        return answered

    def _admit(self, found: dict[int, str]) -> None:
        taken = {client: node for node, client in self._client_of_node.items()}
        for node_id, client_id in found.items():
            other = taken.get(client_id)
            if other is not None and other != node_id:
                raise ClientIdentityError(
                    f"client id {client_id!r} is claimed by nodes {other} and {node_id}; "
                    "each organisation must run exactly one node"
                )
            taken[client_id] = node_id
            self._client_of_node[node_id] = client_id
            _log.debug("node %s is client %s", node_id, client_id)
