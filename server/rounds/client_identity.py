"""Map Flower node ids to the stable client ids the history is keyed by, from what Flower tells the server.

Node ids are random per simulation run and say nothing about who an
organisation is, so history keyed by them could never be unlearned later.
The server reads every node's ``NodeInfo`` (``grid.get_nodes()``) and never
asks the ClientApp, so an unchanged Flower ClientApp is recorded as it is.
Flower 1.42 gives three kinds of node (checked in its source and in runs):

- **A registered name** (deployment, ``flwr supernode register ... --name
  NAME``): the client id is the name. It is the organisation's own and the
  SuperLink keeps it across restarts.
- **A simulated node** (``run_simulation`` or ``flwr run`` on a simulation
  SuperLink): no name, a random 32-byte key, and a heartbeat interval of
  ``HEARTBEAT_INTERVAL_INF``. Flower registers simulated nodes one after
  another and gives the i-th the node config ``partition-id = i``, so the
  client id is ``str(i)``, the node's rank by registration time: the partition
  a quickstart ClientApp loads its data by, and the same in every run.
- **An unnamed deployed node**: the client id is ``node-`` and the start of
  the sha256 of its public key. That key is stable only if the SuperNode was
  started with ``--auth-supernode-private-key``; one that registers itself
  makes a new key at every start. The server cannot tell the two apart, so a
  history keyed this way cannot be continued by a later run
  (:func:`check_continuity`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from logging import getLogger
from typing import Literal

from flwr.common.constant import HEARTBEAT_INTERVAL_INF
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid

from fedforget.errors import FedforgetError

_log = getLogger(__name__)

IdentityKind = Literal["registered-name", "simulation-partition", "node-key"]
REGISTERED_NAME: IdentityKind = "registered-name"
SIMULATION_PARTITION: IdentityKind = "simulation-partition"
NODE_KEY: IdentityKind = "node-key"

IDENTITY_META = "client_identities"
"""History-store meta key: client id -> the kind of identity it was recorded under."""

_DESCRIBED: dict[str, str] = {
    REGISTERED_NAME: "their SuperNode's registered name (a deployment)",
    SIMULATION_PARTITION: "their partition in Flower's simulation",
    NODE_KEY: "their SuperNode's key (a deployment whose nodes have no registered name)",
}


class ClientIdentityError(FedforgetError):
    """A node's stable client id could not be established, or would not match the history's."""


class ClientIdResolver:
    """Resolve and remember node id → client id (and its kind) for the nodes of one run."""

    def __init__(self) -> None:
        self._client_of_node: dict[int, str] = {}
        self._kind_of_client: dict[str, IdentityKind] = {}

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

    def kinds(self) -> dict[str, IdentityKind]:
        """The kind of identity of every resolved client."""
        return dict(self._kind_of_client)

    def resolve(self, grid: Grid, node_ids: Iterable[int]) -> dict[int, str]:
        """Identify ``node_ids`` (cached) from the grid's ``NodeInfo``; no message is sent."""
        wanted = list(node_ids)
        if any(node not in self._client_of_node for node in wanted):
            nodes = list(grid.get_nodes())
            found = _identify(nodes)
            missing = sorted(set(wanted) - set(found))
            if missing:
                raise ClientIdentityError(
                    f"nodes {missing} are not listed by grid.get_nodes(); they cannot be identified"
                )
            self._admit(found)
        return {node: self._client_of_node[node] for node in wanted}

    def _admit(self, found: Mapping[int, tuple[str, IdentityKind]]) -> None:
        taken = {client: node for node, client in self._client_of_node.items()}
        for node_id, (client_id, kind) in found.items():
            known = self._client_of_node.get(node_id)
            if known is not None and known != client_id:
                raise ClientIdentityError(
                    f"node {node_id} was client {known!r} and now reads as {client_id!r}: Flower's node "
                    "list changed under the run (simulated nodes registered out of order?)"
                )
            other = taken.get(client_id)
            if other is not None and other != node_id:
                raise ClientIdentityError(
                    f"client id {client_id!r} is claimed by nodes {other} and {node_id}; "
                    "each organisation must run exactly one node"
                )
            taken[client_id] = node_id
            if known is None:
                self._client_of_node[node_id] = client_id
                self._kind_of_client[client_id] = kind
                _log.debug("node %s is client %s (%s)", node_id, client_id, kind)


def _identify(nodes: list[NodeInfo]) -> dict[int, tuple[str, IdentityKind]]:
    """Client id and kind of every listed node."""
    found: dict[int, tuple[str, IdentityKind]] = {}
    simulated = []
    for info in nodes:
        if info.name:
            found[info.node_id] = (info.name, REGISTERED_NAME)
        elif info.heartbeat_interval >= HEARTBEAT_INTERVAL_INF:
            simulated.append(info)
        else:
            digest = hashlib.sha256(bytes(info.public_key)).hexdigest()[:16]
            found[info.node_id] = (f"node-{digest}", NODE_KEY)
    for rank, info in enumerate(_by_registration(simulated)):
        found[info.node_id] = (str(rank), SIMULATION_PARTITION)
    return found


def _by_registration(nodes: list[NodeInfo]) -> list[NodeInfo]:
    """Simulated nodes in the order Flower registered them, which is the order of their partition ids."""
    stamped = []
    for info in nodes:
        try:
            stamped.append((dt.datetime.fromisoformat(info.registered_at), info))
        except ValueError:
            raise ClientIdentityError(
                f"simulated node {info.node_id} has no registration time ({info.registered_at!r}); "
                "its partition cannot be told"
            ) from None
    stamped.sort(key=lambda pair: pair[0])
    for (first, a), (second, b) in zip(stamped, stamped[1:]):
        if first == second:
            raise ClientIdentityError(
                f"simulated nodes {a.node_id} and {b.node_id} were registered at the same instant "
                f"({a.registered_at}); which partition each holds cannot be told"
            )
    return [info for _, info in stamped]


def check_continuity(recorded: Mapping[str, str], current: Mapping[str, str], store_path: object) -> None:
    """Refuse to add rounds to a history recorded by an earlier run if client ids may not mean the same.

    ``recorded`` is the kind of every client in the history (store meta
    :data:`IDENTITY_META`), ``current`` the kind of every client this run has
    identified so far.
    """
    by_key = sorted(client for client, kind in recorded.items() if kind == NODE_KEY)
    if by_key:
        raise ClientIdentityError(
            f"the history in {store_path} keys clients {', '.join(by_key)} by their SuperNode's key, because "
            "their nodes had no registered name. A SuperNode started without --auth-supernode-private-key "
            "makes a new key at every start, so this run could record the same organisation under a new id, "
            "and its earlier updates would then escape unlearning. Register every SuperNode with "
            "`flwr supernode register KEY.pub CONNECTION --name NAME` and start a new history store."
        )
    foreign = sorted(set(current.values()) - set(recorded.values()))
    if recorded and foreign:
        was = " and ".join(_DESCRIBED[k] for k in sorted(set(recorded.values())) if k in _DESCRIBED)
        now = " and ".join(_DESCRIBED[k] for k in foreign if k in _DESCRIBED)
        raise ClientIdentityError(
            f"the history in {store_path} keys its clients by {was}, but this run identifies its nodes by "
            f"{now}; continuing would record one organisation under two ids. Continue the history in the "
            "mode it was recorded in, or start a new history store."
        )
