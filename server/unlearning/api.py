"""Unlearning from your own ServerApp: one object, one call, in the style of Opacus's ``PrivacyEngine``.

A ServerApp that trains with :class:`~fedforget.server.rounds.recording.RecordingFedAvg`
(Flower's ``FedAvg`` plus recording) makes an :class:`Unlearning` next to it
and calls :meth:`Unlearning.unlearn` between two ``strategy.start(...)``
calls. The call does everything the built-in round loop does, through the
same :class:`~fedforget.server.unlearning.coordinator.UnlearningCoordinator`,
and training goes on with Flower's own ``strategy.start``, from the model the
report gives, with the history's round count going on too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedforget import wire
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.rounds.recording import TRAIN_CONFIG_META, RecordingFedAvg
from fedforget.server.state_dir import StateDir
from fedforget.server.unlearning.coordinator import EvaluateFn, UnlearningCoordinator, check_unlearnable
from fedforget.server.withdrawal.consent import WithdrawalNotice
from fedforget.strategies.base import Unlearner
from fedforget.strategies.registry import StrategyChoice
from fedforget.strategies.settings import UnlearningContext

OPERATOR_REASON = "erasure ordered by the federation's operator"


@dataclass(frozen=True)
class UnlearningReport:
    """What one unlearning did, and the model training continues from."""

    arrays: ArrayRecord
    """The unlearned global model: pass it to ``strategy.start(initial_arrays=...)``."""
    clients: tuple[str, ...]
    strategy: str
    before_round: int
    """The first round of the history trained without the clients."""
    seconds: float
    client_epochs: float
    round_trips: int
    """Times the unlearning waited for clients (each a deployed round trip)."""
    rounds_replayed: int
    trajectory: int
    """The history's new trajectory, which training continues in."""
    certificates: dict[str, Path]
    """One signed certificate per client (empty without a signing key)."""
    event: dict[str, object]
    """The unlearning event as recorded in the history store."""


class Unlearning:
    """Unlearn clients from the history ``strategy`` records, between two ``strategy.start`` calls.

    Parameters
    ----------
    strategy:
        The :class:`RecordingFedAvg` the ServerApp trains with.
    signing_key:
        The federation's private key (``fedforget certs`` writes
        ``federation.key``; ``fedforget keys generate`` makes one). With it,
        every round and unlearning is written to the ledger
        ``STATE/state/ledger.jsonl`` and each unlearning gets a certificate in
        ``STATE/certificates/``, where STATE is the directory holding the
        store (the layout ``fedforget simulate`` and ``flwr run`` use).
        Without it there is no ledger and no certificate; the withdrawn
        clients' data keys are destroyed either way.
    seed:
        Recorded with each unlearning; strategies draw their randomness from it.
    round_timeout:
        Seconds to wait for the replies of a replayed round.
    evaluate_fn:
        Central evaluation (model arrays -> ``{"test_accuracy": ...}``), for
        the accuracy before and after in the report.

    Creating it rolls back an unlearning an earlier process left half done,
    so create it before training, once per strategy: with a signing key it
    writes every round the strategy commits to the ledger.
    """

    def __init__(
        self,
        strategy: RecordingFedAvg,
        *,
        signing_key: Path | str | None = None,
        seed: int = 0,
        round_timeout: float = 600.0,
        evaluate_fn: EvaluateFn | None = None,
    ) -> None:
        self.strategy = strategy
        self.state = StateDir(Path(strategy.store.path).resolve().parent)
        accountability = None
        if signing_key is not None:
            accountability = Accountability(
                ledger_path=self.state.ledger,
                server_key=Path(signing_key),
                certificates_dir=self.state.certificates,
                federation_id=strategy.store.federation_id,
            )
        self._coordinator = UnlearningCoordinator(
            strategy, accountability=accountability, seed=seed, round_timeout=round_timeout, evaluate_fn=evaluate_fn
        )
        self._coordinator.prepare()

    def unlearn(
        self,
        grid: Grid,
        clients: str | Sequence[str],
        strategy: str | Unlearner = "retrain",
        *,
        reason: str = OPERATOR_REASON,
        settings: Mapping[str, object] | None = None,
    ) -> UnlearningReport:
        """Remove ``clients``' contributions from the global model, now; return the model to continue from.

        ``strategy`` is a name (``retrain``, ``subtract``, ``replay``,
        ``calibrated``, ``fedrecovery``, ``gradient-ascent``, ``relabel``, ``misdirect``, or one you
        registered) or an :class:`~fedforget.strategies.base.Unlearner`;
        ``settings`` are the named strategy's settings by option name (e.g.
        ``{"recovery-rounds": 2}``); it learns the federation's own epochs and
        retention interval from the run. The clients get no instruction from now on.
        The ledger and certificate record the erasure as operator-initiated,
        with ``reason``.
        Raises :class:`~fedforget.server.unlearning.coordinator.UnlearningError`
        if a client is not in the history, or if the result would still hold
        one; the history is then left as it was.
        """
        wanted = [clients] if isinstance(clients, str) else list(clients)
        self.strategy.flush()
        check_unlearnable(self.strategy.store, wanted, must_be_recorded=True)
        if isinstance(strategy, Unlearner):
            unlearner = strategy
        else:
            unlearner = StrategyChoice(strategy, dict(settings or {})).build(self._context())
        coordinator = self._coordinator
        coordinator.train_config = self._train_config()
        notices = [WithdrawalNotice.by_operator(client, reason) for client in sorted(set(wanted))]
        unlearned = coordinator.unlearn(grid, notices, unlearner)
        event = unlearned.event
        return UnlearningReport(
            arrays=wire.record_from_arrays(unlearned.model),
            clients=tuple(event["clients"]),
            strategy=str(event["strategy"]),
            before_round=int(event["round"]),
            seconds=float(event["seconds"]),
            client_epochs=float(event["client_epochs"]),
            round_trips=int(event["round_trips"]),
            rounds_replayed=int(event["rounds_replayed"]),
            trajectory=int(event["trajectory"]),
            certificates={c: Path(p) for c, p in dict(event.get("certificates", {})).items()},
            event=event,
        )

    def _train_config(self) -> dict[str, int | float | str | bool]:
        """What replayed rounds tell clients: the run's own train config."""
        config = self.strategy.train_config
        if config is None:
            config = dict(self.strategy.store.get_meta(TRAIN_CONFIG_META, {}) or {})
        return dict(config)

    def _context(self) -> UnlearningContext:
        epochs = self._train_config().get(wire.LOCAL_EPOCHS, self.strategy.local_epochs)
        return UnlearningContext(
            local_epochs=float(epochs) if epochs is not None else 1.0,
            retention_interval=self.strategy.store.retention_interval,
        )
