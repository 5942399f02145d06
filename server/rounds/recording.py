"""FedAvg that records every round into the history store.

This is Flower's own message-API ``FedAvg`` with recording added: before
averaging, each client's update (returned weights minus the weights it was
sent) is written to the :class:`~fedforget.server.store.history_store.HistoryStore`
with its example count and aggregation weight, and the round is committed with
its result. A ServerApp that uses ``FedAvg`` gets history recording by swapping
in this class; its clients need not change (clients are identified from
Flower's own node list, see :mod:`~fedforget.server.rounds.client_identity`).

The history must explain the model, so the strategy refuses what would break
that (:mod:`~fedforget.server.rounds.history_position`): a round that does not
follow the store's last one, a round started from a model that is not the
history's last model (say, the model from before an unlearning), and any
instruction to a client an unlearning removed. These are read from the store,
so they hold in a later run too.

Sampled participation (``fraction_train`` < 1) is Flower's own: ``FedAvg``
draws each round's nodes with ``random.sample`` from the consenting nodes.
Two things make a draw reproducible: the nodes are listed in client-id order
(:class:`~fedforget.server.rounds.grids.ConsentingGrid`), not in the order of
Flower's random node ids, and with ``sampling_seed`` set the draw of history
round ``t`` uses Python's ``random`` seeded with ``(sampling_seed, t)`` (the
module's global state is saved and restored around it). So a run, and a
resumed run, samples the same clients in every round. Who took part is
recorded with each round; an exact retrain replays those recorded
participants (:meth:`RecordingFedAvg.only`) rather than drawing again.

Writes run on a low-priority background thread (see
:mod:`~fedforget.server.rounds.background_writer`) so that they overlap with
the next round's training; that includes working out each reply's update, so a
round's critical path only averages. Call :meth:`RecordingFedAvg.flush` before
reading the store while the strategy is in use.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from logging import WARNING, getLogger
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedforget import wire
from fedforget.arrays import Arrays, subtract
from fedforget.server.rounds.background_writer import BackgroundWriter
from fedforget.server.rounds.client_identity import IDENTITY_META, ClientIdResolver
from fedforget.server.rounds.grids import ConsentingGrid
from fedforget.server.rounds.history_position import HistoryPosition, RecordingError
from fedforget.server.rounds.private_aggregation import PrivateAggregation, settle_privacy
from fedforget.privacy import CLIPPING_NORM, NOISE_STD, PrivacySettings, local_dp_config
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.events import completed_unlearnings, interrupted_clients, withdrawn_clients

_log = getLogger(__name__)

TRAIN_CONFIG_META = "train_config"
"""History-store meta key: the train config of the last recorded round, for replays in a later process."""


@dataclass(frozen=True)
class Contribution:
    """One client's part in a round: its update against the model the round started from.

    ``update`` may also be a function that computes it when the round is
    recorded: a reply's update is worked out on the recording thread, off the
    round's critical path (copying a million-parameter reply out of its
    ArrayRecord and subtracting the model it was sent takes about 20 ms).
    """

    client_id: str
    update: Arrays | Callable[[], Arrays]
    num_examples: int

    def arrays(self) -> Arrays:
        """The update itself, computed now if it was given as a function."""
        return self.update() if callable(self.update) else self.update


@dataclass(frozen=True)
class _ReplyUpdate:
    """A reply's update, computed when called: returned weights minus the weights sent."""

    returned: ArrayRecord
    sent: Arrays

    def __call__(self) -> Arrays:
        return subtract(wire.array_views(self.returned), self.sent)


@dataclass(frozen=True)
class RecordedRound:
    """Who contributed to the last recorded round, and how much work it took."""

    round: int
    participants: tuple[str, ...]
    num_examples: int
    client_epochs: float
    examples: dict[str, int]
    """Training examples per participant (what FedAvg weighted by)."""


@dataclass(frozen=True)
class CommittedRound:
    """A round the store has just committed, as a commit listener (the ledger) sees it."""

    trajectory: int
    round: int
    model_after: Arrays
    recorded: RecordedRound


CommitListener = Callable[[CommittedRound], None]


class MissingParticipantError(RecordingError):
    """A round to be trained with named clients (an exact replay) cannot reach one of them."""


class RecordingFedAvg(FedAvg):
    """Federated averaging that keeps every client's update, keyed by stable client id.

    Parameters
    ----------
    store:
        Where rounds are recorded. Rounds must follow the store's current
        trajectory: a round ``t`` called by the caller's own loop may only be
        trained once rounds ``1..t-1`` are committed there; :meth:`start`
        continues the history's count by itself.
    identities:
        Maps node ids to client ids. Pass one in to share it with other
        components of the ServerApp.
    local_epochs:
        Epochs a client trains per round when neither the train config
        (``local-epochs``) nor the client's reply says; used for cost figures
        only. Flower's quickstart ClientApps read theirs from the run config:
        pass the same value here. Without it, such a round counts one epoch
        per client and a warning says so.
    sampling_seed:
        Seeds Flower's client sampling per round (see the module docstring),
        so that a run with ``fraction_train`` < 1 samples the same clients
        when it is repeated or resumed. ``None`` leaves Flower's draw unseeded.
    privacy:
        Differentially private training (:mod:`fedforget.privacy`). Do not wrap
        this strategy in one of Flower's DP wrappers: the wrapper would noise the
        average after it was recorded, so the history would not hold the model
        the clients receive. Given here, the same wrapper runs *inside* the
        round (:mod:`~fedforget.server.rounds.private_aggregation`) and the
        history records the clipped updates and the noised model. Under
        ``local`` DP the train config tells each client z and C, and every
        reply must say it added the noise.
    **fedavg_kwargs:
        Passed to Flower's ``FedAvg`` unchanged.
    """

    def __init__(
        self,
        store: HistoryStore,
        *,
        identities: ClientIdResolver | None = None,
        local_epochs: float | None = None,
        sampling_seed: int | None = None,
        privacy: PrivacySettings | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.store = store
        self.identities = identities or ClientIdResolver()
        self.local_epochs = local_epochs
        self.sampling_seed = sampling_seed
        self._excluded: set[str] = set()
        self._only: frozenset[str] | None = None
        self._sent: dict[int, tuple[Arrays, dict[str, Any]]] = {}
        self._writer = BackgroundWriter()
        self._listeners: list[CommitListener] = []
        self._position = HistoryPosition(store, self.identities, self.flush)
        self._warned_epochs = False
        self.last_recorded: RecordedRound | None = None
        self.train_config: dict[str, Any] | None = None
        """The train config of the last round configured (``server-round`` left out)."""
        self.privacy = privacy
        secret = settle_privacy(store, privacy)
        self._private = (
            PrivateAggregation(privacy, secret, self._average, self._num_examples, self._recorded_metrics)
            if privacy is not None and secret is not None else None
        )

    # -- the store -------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every recorded round is committed to the store (re-raising a failed write).

        Call it before reading or changing the store directly; afterwards the
        strategy re-reads the store's progress, so a fork or resume is
        followed, and excludes every client an unlearning recorded there.
        """
        self._writer.flush()
        self._position.forget()
        self._excluded.update(withdrawn_clients(completed_unlearnings(self.store)) | interrupted_clients(self.store))

    def submit_write(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the recording thread after the rounds recorded so far (e.g. saving metadata)."""
        self._writer.submit(job)

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener`` on the recording thread after each round the store commits, in order."""
        self._listeners.append(listener)

    def current_arrays(self) -> ArrayRecord:
        """The history's last global model: what the next round must start from (e.g. after a resume)."""
        self.flush()
        return wire.record_from_arrays(self.store.read_model(self.store.last_completed_round()))

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """Flower's own round loop, continuing the history's round count; returns once all is committed.

        ``num_rounds`` rounds are trained; after ``k`` rounds in the history
        they are recorded (and sent to clients) as rounds ``k+1..k+num_rounds``,
        while Flower's log counts them from 1. ``initial_arrays`` must be the
        history's last model: after an unlearning, the unlearned model.
        """
        self.flush()
        self._position.follow_flower(True)
        try:
            return super().start(*args, **kwargs)
        finally:
            self._position.follow_flower(False)
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

    @contextlib.contextmanager
    def only(self, clients: Collection[str]) -> Iterator[None]:
        """Within the block, a configured training round goes to exactly ``clients``: no sampling.

        An exact retrain replays a recorded round with the clients that took
        part in it (minus the withdrawn ones). Every one of them must be
        connected and consenting; otherwise :meth:`configure_train` raises
        :class:`MissingParticipantError`, since training without one of them
        would silently no longer be the retrain it claims to be.
        """
        chosen = frozenset(clients)
        if not chosen:
            raise ValueError("a round needs at least one client; record a round nobody trained with record_round")
        self._only = chosen
        try:
            yield
        finally:
            self._only = None

    # -- training ------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the round follows the history from its last model, remember what is sent, skip withdrawn clients."""
        history_round = self._position.round_to_configure(server_round)
        model = wire.arrays_from_record(arrays)
        self._position.check_start(history_round, model)
        if self.privacy is not None and not self.privacy.central:
            for key, value in local_dp_config(self.privacy).items():
                config[key] = value
        self.train_config = {k: v for k, v in config.items() if k != "server-round"}
        if self._only is not None:
            messages = self._messages_to(self._only, history_round, arrays, config, grid)
        else:
            with self._seeded_sampling(history_round):
                messages = list(super().configure_train(history_round, arrays, config, self._view(grid)))
        self._sent[history_round] = (model, dict(self.train_config))
        return messages

    def sample_clients(self, history_round: int, grid: Grid, *, draw: int = 0) -> list[str]:
        """The consenting clients Flower's sampling picks for work at ``history_round`` that is not a round.

        Unrecorded client work an unlearning asks for without naming clients
        (recovery rounds, say) trains the share a live round would: the same
        ``fraction_train``, drawn by Flower's ``sample_nodes``. ``draw`` > 0
        seeds further draws at the same round differently (``sampling_seed``
        set), so that repeated work at one round does not ask one sample again.
        """
        view = self._view(grid)
        nodes = list(view.get_node_ids())
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        with self._seeded_sampling(history_round, draw):
            chosen, _ = sample_nodes(view, self.min_available_nodes, min(size, len(nodes)))
        clients = self.identities.resolve(grid, chosen)
        return sorted(clients[node] for node in chosen)

    @contextlib.contextmanager
    def _seeded_sampling(self, history_round: int, draw: int = 0) -> Iterator[None]:
        """Flower's ``random.sample`` seeded by (``sampling_seed``, round); the global state restored after.

        A string seed is hashed (SHA-512) by ``random.seed``, the same in every
        process, so the draw of round ``t`` does not depend on what else used
        ``random`` before it: a resumed run draws what the first one drew.
        """
        if self.sampling_seed is None:
            yield
            return
        saved = random.getstate()
        suffix = f":{draw}" if draw else ""
        random.seed(f"fedforget-sampling:{self.sampling_seed}:{history_round}{suffix}")
        try:
            yield
        finally:
            random.setstate(saved)

    def _messages_to(
        self, clients: frozenset[str], history_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Train messages to the nodes of exactly ``clients`` (see :meth:`only`)."""
        withdrawn = sorted(clients & self._excluded)
        if withdrawn:
            raise MissingParticipantError(
                f"round {history_round} was to be replayed with client(s) {', '.join(withdrawn)}, who withdrew; "
                "nothing was sent"
            )
        view = self._view(grid)
        nodes = self.identities.resolve(grid, list(view.get_node_ids()))
        chosen = sorted((client, node) for node, client in nodes.items() if client in clients)
        missing = sorted(clients - {client for client, _ in chosen})
        if missing:
            raise MissingParticipantError(
                f"round {history_round} must be replayed with the client(s) that took part in it, but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not connected; an exact retrain "
                "cannot leave them out. Reconnect them and run the unlearning again, or choose an approximate "
                "strategy that uses their stored updates (calibrated, replay)."
            )
        config["server-round"] = history_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for _, node in chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average as FedAvg does, then record each update and commit the round."""
        history_round = self._position.configured_round(server_round)
        # FedAvg sums the updates in reply order, which Flower leaves to chance; in client-id order a
        # round is a function of its inputs, so an exact retrain reproduces training bit for bit.
        known = self.identities.known()
        kept = sorted(self._drop_withdrawn(list(replies)), key=lambda m: known.get(m.metadata.src_node_id, ""))
        sent = self._sent.pop(history_round, None)
        if sent is None:
            raise RecordingError(f"round {history_round} was aggregated without being configured by this strategy")
        model_sent, config_sent = sent
        arrays, metrics, privacy_facts = self._aggregate(history_round, kept, model_sent)
        if arrays is None:
            return arrays, metrics
        contributions, client_epochs = [], 0.0
        for msg in (m for m in kept if not m.has_error()):
            client_id = self.identities.client_id(msg.metadata.src_node_id)
            returned = next(iter(msg.content.array_records.values()))
            reported = next(iter(msg.content.metric_records.values()))
            update = _ReplyUpdate(returned, model_sent)
            contributions.append(Contribution(client_id, update, self._num_examples(msg)))
            client_epochs += self._epochs(client_id, reported, config_sent)
        round_metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        round_metrics = {k: v for k, v in round_metrics.items() if not k.startswith("dp-")} | privacy_facts
        self.record_round(
            history_round, wire.arrays_from_record(arrays), contributions, metrics=round_metrics,
            client_epochs=client_epochs,
        )
        return arrays, metrics

    def record_round(
        self,
        server_round: int,
        model_after: Arrays,
        contributions: Sequence[Contribution],
        *,
        metrics: dict[str, float] | None = None,
        client_epochs: float = 0.0,
    ) -> RecordedRound:
        """Record a round (each update weighted n_k / Σn) and commit it, on the recording thread.

        Every recorded round goes through here: those this strategy averaged
        and those an unlearning strategy computed itself. ``contributions`` may
        be empty: the round then only records ``model_after``.
        """
        self._position.require_next(server_round)
        self._position.check_identities([c.client_id for c in contributions])
        total = float(sum(c.num_examples for c in contributions))
        recorded = RecordedRound(
            round=server_round,
            participants=tuple(sorted(c.client_id for c in contributions)),
            num_examples=int(total),
            client_epochs=client_epochs,
            examples={c.client_id: c.num_examples for c in contributions},
        )
        kinds = self.identities.kinds()
        new_kinds = {c.client_id: kinds[c.client_id] for c in contributions if c.client_id in kinds}
        train_config = dict(self.train_config) if self.train_config is not None else None

        def record() -> None:
            for c in contributions:
                self.store.record_update(
                    server_round, c.client_id, c.arrays(), num_examples=c.num_examples, weight=c.num_examples / total
                )
            self.store.commit_round(server_round, model_after, metrics=metrics)
            self._remember(new_kinds, train_config)
            committed = CommittedRound(self.store.current_trajectory(), server_round, model_after, recorded)
            for listener in self._listeners:
                listener(committed)

        self._writer.submit(record)
        self._position.recorded(server_round, model_after)
        self.last_recorded = recorded
        return recorded

    def _aggregate(
        self, history_round: int, kept: list[Message], model_sent: Arrays
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, float]]:
        """The round's average: FedAvg's, or through Flower's DP wrapper; with the round's DP facts."""
        if self._private is not None:
            return self._private.aggregate(
                self._position.trajectory(), history_round, kept, wire.record_from_arrays(model_sent)
            )
        arrays, metrics = self._average(history_round, kept)
        if self.privacy is None or arrays is None:
            return arrays, metrics, {}
        # Local DP: the clients clipped and noised; each must say so, or the history would claim noise it lacks.
        z, clip = self.privacy.noise_multiplier, self.privacy.clipping_norm
        for msg in (m for m in kept if not m.has_error()):
            reported = next(iter(msg.content.metric_records.values()))
            if float(reported.get(NOISE_STD, 0.0)) < z * clip or float(reported.get(CLIPPING_NORM, np.inf)) > clip:  # type: ignore[arg-type]
                raise RecordingError(
                    f"round {history_round}: node {msg.metadata.src_node_id} replied without local DP noise of std "
                    f"{z * clip:g} after clipping to {clip:g} (it reported {NOISE_STD}={reported.get(NOISE_STD)}); its "
                    "ClientApp needs fedforget.client.local_privacy.local_dp_mod"
                )
        return arrays, metrics, {NOISE_STD: z * clip, CLIPPING_NORM: clip}

    def _average(self, history_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg average, unchanged."""
        return super().aggregate_train(history_round, replies)

    def _recorded_metrics(self, server_round: int) -> dict[str, float] | None:
        """The metrics the current trajectory recorded for ``server_round`` (settled store), or None."""
        self.flush()
        for view in self.store.reader().rounds(server_round, server_round):
            return dict(view.metrics)
        return None

    # -- evaluation ----------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate on consenting clients only: a withdrawn client gets no instruction at all."""
        history_round = self._position.configured_round(server_round)
        return super().configure_evaluate(history_round, arrays, config, self._view(grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._drop_withdrawn(list(replies)))

    # -- helpers -------------------------------------------------------------

    def _remember(self, kinds: dict[str, str], train_config: dict[str, Any] | None) -> None:
        """Store what a later process needs (runs on the recording thread)."""
        stored = dict(self.store.get_meta(IDENTITY_META, {}) or {})
        if any(stored.get(client) != kind for client, kind in kinds.items()):
            self.store.set_meta(IDENTITY_META, {**stored, **kinds})
        if train_config is not None and self.store.get_meta(TRAIN_CONFIG_META) != train_config:
            self.store.set_meta(TRAIN_CONFIG_META, train_config)

    def _epochs(self, client_id: str, reported: MetricRecord, config: dict[str, Any]) -> float:
        """A client's work in a round: what it reported, else what it was asked for, else ``local_epochs``."""
        if wire.LOCAL_EPOCHS in reported:
            return float(reported[wire.LOCAL_EPOCHS])  # type: ignore[arg-type]
        if wire.LOCAL_EPOCHS in config:
            return float(config[wire.LOCAL_EPOCHS])
        if self.local_epochs is not None:
            return float(self.local_epochs)
        if not self._warned_epochs:
            self._warned_epochs = True
            _log.warning(
                "client %s reported no %r and the train config asks for none: its cost is counted as one "
                "epoch per round; pass RecordingFedAvg(..., local_epochs=E) for exact figures",
                client_id, wire.LOCAL_EPOCHS,
            )
        return 1.0

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

    def _num_examples(self, msg: Message) -> int:
        value = next(iter(msg.content.metric_records.values()))[self.weighted_by_key]
        number = float(np.asarray(value))
        if number <= 0:
            raise RecordingError(
                f"node {msg.metadata.src_node_id} reported {self.weighted_by_key}={number}; "
                "an update needs a positive weight"
            )
        return int(number)
