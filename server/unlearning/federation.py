"""The Flower side of the :class:`~fedforget.strategies.base.Federation` handle unlearning strategies use.

Strategies know nothing of Flower; this handle gives them the client work
and the recording they ask for, on a live Flower ``Grid``, through the run's
:class:`~fedforget.server.rounds.recording.RecordingFedAvg`, so rounds a
strategy replays or computes are recorded (and, with a ledger, accounted for)
exactly as training rounds are.

It is built for one set of withdrawn clients and excludes them at once: no
path through it sends them work or records a round that holds them. Trying
raises :class:`WithdrawnClientError`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from logging import getLogger

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedforget import wire
from fedforget.arrays import Arrays, subtract
from fedforget.errors import FedforgetError
from fedforget.server.rounds.one_round import RunError, train_recorded_round
from fedforget.server.rounds.recording import Contribution, RecordingFedAvg
from fedforget.server.unlearning.events import UNLEARNING_KIND
from fedforget.strategies.base import ClientOfflineError, ClientUpdate, Federation, RoundResult
from fedforget.strategies.client_methods import ClientMethod, method_config

_log = getLogger(__name__)

TrainConfig = Mapping[str, int | float | str | bool]


class WithdrawnClientError(FedforgetError):
    """A withdrawn client would have trained, or been recorded, during its own unlearning."""


class NoClientsError(FedforgetError):
    """A strategy asked for client work while no federation is connected (``fedforget unlearn``)."""


class FlowerFederation(Federation):
    """Client work and recording for an unlearning of ``withdrawn``, on a Flower grid.

    Parameters
    ----------
    grid:
        The ServerApp's grid; ``None`` when no federation is connected, in
        which case only strategies that need no client work can run.
    strategy:
        The recording strategy of the run: rounds go into its history store.
    withdrawn:
        The clients being unlearned. They are excluded from ``strategy``
        here and now: they get no instruction of any kind from then on.
    train_config:
        What every client is told in a replayed round (learning rate, epochs,
        seed); the run's own train config.
    round_timeout:
        Seconds to wait for a round's replies.
    """

    def __init__(
        self,
        grid: Grid | None,
        strategy: RecordingFedAvg,
        *,
        withdrawn: Collection[str],
        train_config: TrainConfig | None = None,
        round_timeout: float = 600.0,
    ) -> None:
        if not withdrawn:
            raise ValueError("name the clients being unlearned: a federation handle always excludes them")
        self.grid = grid
        self.strategy = strategy
        self.withdrawn = frozenset(withdrawn)
        self.train_config = dict(train_config or {})
        self.round_timeout = round_timeout
        self._draws: dict[int, int] = {}
        """Samples drawn per round for local training named no clients (each draw is seeded differently)."""
        strategy.exclude(self.withdrawn)

    def _connected(self, what: str) -> Grid:
        if self.grid is None:
            raise NoClientsError(
                f"the unlearning strategy asked for {what}, but no federation is connected; use a strategy "
                "that needs no client work (subtract), or unlearn inside a run"
            )
        return self.grid

    def _nodes(self) -> dict[int, str]:
        """Connected nodes of clients that may still take part, by node id."""
        if self.grid is None:
            return {}
        clients = self.strategy.identities.resolve(self.grid, list(self.grid.get_node_ids()))
        return {node: client for node, client in clients.items() if client not in self.strategy.excluded}

    def _refuse_withdrawn(self, clients: Collection[str], what: str) -> None:
        caught = sorted(self.withdrawn & set(clients))
        if caught:
            raise WithdrawnClientError(
                f"{what} would include withdrawn client(s) {', '.join(caught)}; nothing was recorded"
            )

    def remaining_clients(self) -> list[str]:
        return sorted(self._nodes().values())

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        named = info.get("clients")
        if isinstance(named, (list, tuple, set, frozenset)) and not set(map(str, named)) <= self.withdrawn:
            raise WithdrawnClientError(
                f"the strategy unlearns {sorted(map(str, named))}, but this federation handle was built for "
                f"{sorted(self.withdrawn)}: the others would go on training"
            )
        self.strategy.flush()
        self.strategy.store.fork(base_version=base_version, info={"kind": UNLEARNING_KIND, **info})

    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        if clients is not None:
            self._refuse_withdrawn(clients, f"round {server_round}")
        result = train_recorded_round(
            self._connected("a training round"), self.strategy, server_round, model,
            train_config=self.train_config, timeout=self.round_timeout, clients=clients,
        )
        # A strategy may read history between its rounds: keep the store settled.
        self.strategy.flush()
        self._refuse_withdrawn(result.participants, f"round {server_round}")
        return result

    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        grid = self._connected("local training")
        nodes = self._nodes()
        if clients is None and self.strategy.fraction_train < 1.0:
            # As a live round would: a sample of the remaining clients, not all of them.
            draw = self._draws.get(server_round, 0)
            self._draws[server_round] = draw + 1
            clients = self.strategy.sample_clients(server_round, grid, draw=draw)
        if clients is not None:
            nodes = {node: client for node, client in nodes.items() if client in set(clients)}
        config = ConfigRecord(dict(self.train_config))
        config[wire.LOCAL_EPOCHS] = float(local_epochs)
        config[wire.SERVER_ROUND] = server_round
        record = wire.record_from_arrays(model)
        messages = [
            Message(
                content=RecordDict({wire.ARRAYS_KEY: record, wire.CONFIG_KEY: config}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in nodes
        ]
        updates = []
        for reply in grid.send_and_receive(messages, timeout=self.round_timeout):
            client_id = nodes.get(reply.metadata.src_node_id)
            if client_id is None:
                continue
            if reply.has_error():
                _log.warning("client %s failed its local training: %s", client_id, reply.error.reason)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            returned = wire.arrays_from_record(next(iter(reply.content.array_records.values())))
            updates.append(
                ClientUpdate(
                    client_id=client_id,
                    update=subtract(returned, model),
                    num_examples=int(metrics[wire.NUM_EXAMPLES]),  # type: ignore[arg-type]
                    epochs=float(metrics.get(wire.LOCAL_EPOCHS, local_epochs)),  # type: ignore[arg-type]
                )
            )
        if not updates:
            raise RunError(f"round {server_round}: no remaining client completed its local training")
        self._refuse_withdrawn([u.client_id for u in updates], f"local training for round {server_round}")
        return sorted(updates, key=lambda u: u.client_id)

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self._refuse_withdrawn([u.client_id for u in updates], f"the round {server_round} the strategy computed")
        self.strategy.record_round(
            server_round,
            model_after,
            [Contribution(u.client_id, u.update, u.num_examples) for u in updates],
            client_epochs=float(sum(u.epochs for u in updates)),
        )
        self.strategy.flush()

    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        grid = self._connected(f"client-side unlearning ({method.method})")
        clients = self.strategy.identities.resolve(grid, list(grid.get_node_ids()))
        node = next((n for n, c in clients.items() if c == client_id), None)
        if node is None:
            raise ClientOfflineError(
                f"client {client_id} is not connected: client-side unlearning ({method.method}) needs the "
                "withdrawing client online; use a strategy that needs no work from it (retrain, calibrated, subtract)"
            )
        config = ConfigRecord({**method_config(method), wire.SEED: self.train_config.get(wire.SEED, 0)})
        content = RecordDict({wire.ARRAYS_KEY: wire.record_from_arrays(model), wire.CONFIG_KEY: config})
        message = Message(content=content, message_type=wire.CLIENT_UNLEARNING_MESSAGE, dst_node_id=node)
        replies = list(grid.send_and_receive([message], timeout=self.round_timeout))
        if not replies:
            raise ClientOfflineError(
                f"client {client_id} did not answer the client-side unlearning ({method.method}) request in time"
            )
        (reply,) = replies
        if reply.has_error():
            raise RunError(f"client {client_id} failed its client-side unlearning ({method.method}): {reply.error.reason}")
        metrics = next(iter(reply.content.metric_records.values()))
        return (
            wire.arrays_from_record(reply.content.array_records[wire.ARRAYS_KEY]),
            float(metrics[wire.LOCAL_EPOCHS]),  # type: ignore[arg-type]
        )
