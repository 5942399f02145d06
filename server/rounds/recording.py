"""FedAvg that records every round into the history store.

This is Flower's own message-API ``FedAvg`` with two additions: before
averaging, each client's update (returned weights minus the weights it was
sent) is written to the :class:`~fedforget.server.store.history_store.HistoryStore`
with its example count and aggregation weight, and the round is committed with
its result. A ServerApp that uses ``FedAvg`` gets history recording by swapping
in this class; its clients need not change.

Writes run on a background thread (see :mod:`~fedforget.server.rounds.background_writer`)
so that they overlap with the next round's training; call :meth:`RecordingFedAvg.flush`
before reading the store while the strategy is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from logging import WARNING, getLogger

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedforget import wire
from fedforget.arrays import Arrays, model_hash, subtract
from fedforget.server.rounds.background_writer import BackgroundWriter
from fedforget.server.rounds.client_identity import ClientIdResolver
from fedforget.server.rounds.grids import ConsentingGrid
from fedforget.server.store.errors import FedforgetError
from fedforget.server.store.history_store import HistoryStore

_log = getLogger(__name__)


class RecordingError(FedforgetError):
    """A round cannot be recorded consistently with the store's history."""


@dataclass(frozen=True)
class RecordedRound:
    """Who contributed to the last recorded round, and how much work it took."""

    round: int
    participants: tuple[str, ...]
    num_examples: int
    client_epochs: float
    examples: dict[str, int]
    """Training examples per participant (what FedAvg weighted by)."""
    update_hashes: dict[str, str]
    """sha256 of each participant's update, as the ledger records it."""


class RecordingFedAvg(FedAvg):
    """Federated averaging that keeps every client's update, keyed by stable client id.

    Parameters
    ----------
    store:
        Where rounds are recorded. Rounds must follow the store's current
        trajectory: round ``t`` may only be trained once rounds ``1..t-1`` are
        committed there.
    identities:
        Maps node ids to client ids (registered names in a deployment, the
        ClientApp's answer in simulation). Pass one in to share it with other
        components of the ServerApp.
    **fedavg_kwargs:
        Passed to Flower's ``FedAvg`` unchanged.
    """

    def __init__(
        self,
        store: HistoryStore,
        *,
        identities: ClientIdResolver | None = None,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.store = store
        self.identities = identities or ClientIdResolver()
        self._excluded: set[str] = set()
        self._sent: dict[int, Arrays] = {}
        self._writer = BackgroundWriter()
        self._next_round: int | None = None
        self.last_recorded: RecordedRound | None = None

    # -- the store -------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every recorded round is committed to the store (re-raising a failed write).

        Call it before reading or changing the store directly; afterwards the
        strategy re-reads the store's progress, so a fork or resume is followed.
        """
        self._writer.flush()
        self._next_round = None

    def submit_write(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the recording thread after the rounds recorded so far (e.g. saving metadata)."""
        self._writer.submit(job)

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """Flower's own round loop, returning only once every round is committed to the store."""
        try:
            return super().start(*args, **kwargs)
        finally:
            self.flush()

    # -- consent -------------------------------------------------------------

    @property
    def excluded(self) -> frozenset[str]:
        """Clients that receive no more instructions and whose replies are dropped."""
        return frozenset(self._excluded)

    def exclude(self, client_ids: Iterable[str]) -> None:
        """Stop sending work to ``client_ids`` from the next configured round on."""
        self._excluded.update(client_ids)

    def _view(self, grid: Grid) -> Grid:
        return ConsentingGrid(grid, self.identities, lambda client: client in self._excluded)

    # -- training ------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model sent out (the base of every update) and skip withdrawn clients."""
        if self._next_round is None:
            self.flush()
            completed = self.store.last_completed_round()
            self._next_round = completed + 1
        if server_round != self._next_round:
            raise RecordingError(
                f"cannot record round {server_round}: the history store at {self.store.path} "
                f"has {self._next_round - 1} completed rounds in its current trajectory, so the next "
                f"round must be {self._next_round} (resume the run instead of restarting it)"
            )
        model = wire.arrays_from_record(arrays)
        if server_round == 1 and not self.store.has_model(0):
            self.store.write_initial_model(model)
        self._sent[server_round] = model
        return super().configure_train(server_round, arrays, config, self._view(grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average as FedAvg does, then record each update and commit the round."""
        kept = self._drop_withdrawn(list(replies))
        arrays, metrics = super().aggregate_train(server_round, kept)
        sent = self._sent.pop(server_round, None)
        if arrays is None:
            return arrays, metrics
        if sent is None:
            raise RecordingError(
                f"round {server_round} was aggregated without being configured by this strategy"
            )
        contributions = [msg for msg in kept if not msg.has_error()]
        examples = [self._num_examples(msg) for msg in contributions]
        total = float(sum(examples))
        updates: list[tuple[str, Arrays, int, float]] = []
        client_epochs = 0.0
        for msg, num_examples in zip(contributions, examples, strict=True):
            client_id = self.identities.client_id(msg.metadata.src_node_id)
            returned = wire.arrays_from_record(next(iter(msg.content.array_records.values())))
            updates.append((client_id, subtract(returned, sent), int(num_examples), num_examples / total))
            client_epochs += float(next(iter(msg.content.metric_records.values())).get(wire.LOCAL_EPOCHS, 0.0))
        model_after = wire.arrays_from_record(arrays)
        round_metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

        def record() -> None:
            for client_id, update, num_examples, weight in updates:
                self.store.record_update(
                    server_round, client_id, update, num_examples=num_examples, weight=weight
                )
            self.store.commit_round(server_round, model_after, metrics=round_metrics)

        self._writer.submit(record)
        self._next_round = server_round + 1
        self.last_recorded = RecordedRound(
            round=server_round,
            participants=tuple(sorted(client_id for client_id, *_ in updates)),
            num_examples=int(total),
            client_epochs=client_epochs,
            examples={client_id: n for client_id, _, n, _ in updates},
            update_hashes={client_id: model_hash(update) for client_id, update, _, _ in updates},
        )
        return arrays, metrics

    # -- evaluation ----------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate on consenting clients only: a withdrawn client gets no instruction at all."""
        return super().configure_evaluate(server_round, arrays, config, self._view(grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._drop_withdrawn(list(replies)))

    # -- helpers -------------------------------------------------------------

    def _drop_withdrawn(self, replies: list[Message]) -> list[Message]:
        kept = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            client_id = self.identities.known().get(node_id)
            if client_id is not None and client_id in self._excluded:
                _log.log(
                    WARNING,
                    "dropped a reply from withdrawn client %s (node %s): it no longer takes part",
                    client_id,
                    node_id,
                )
                continue
            kept.append(msg)
        return kept

    def _num_examples(self, msg: Message) -> float:
        value = next(iter(msg.content.metric_records.values()))[self.weighted_by_key]
        number = float(np.asarray(value))
        if number <= 0:
            raise RecordingError(
                f"node {msg.metadata.src_node_id} reported {self.weighted_by_key}={number}; "
                "an update needs a positive weight"
            )
        return number
