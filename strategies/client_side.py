"""What every client-side unlearning strategy does around the client's own step, written once.

The withdrawing client (still online, as gradient ascent already assumes)
unlearns itself on its own data from the current global model, then the
remaining clients run the recovery rounds every client-side strategy ends
with: FedAvg rounds that repair what the client's step broke for everyone
else. Those rounds are also the only "retain data" the unlearning sees: the
remaining clients contribute training, never raw data.

All client work happens before the store is touched: if the client is
offline (:class:`~fedforget.strategies.base.ClientOfflineError`) nothing is
written. The result is recorded as version ``completed`` of a trajectory
forked at ``completed − 1``, as a round without participants.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from fedforget.strategies.base import Federation, HistoryView, UnlearningOutcome, UnlearningRequest, Unlearner
from fedforget.strategies.client_methods import ClientMethod
from fedforget.strategies.toolkit import first_contribution, nothing_to_unlearn, recover_and_record


class ClientSideUnlearner(Unlearner):
    """The withdrawing client runs :meth:`method` on its own data from w_T, then ``recovery_rounds`` FedAvg rounds.

    Exactly one client per request (the method runs on that client's data):
    several raise ``ValueError``. A client that never took part leaves the
    model unchanged (new trajectory at ``completed``, no client work).
    ``rounds_replayed`` is the number of recovery rounds, ``base_version``
    is ``completed − 1``. The settings dataclass needs a ``recovery_rounds``.
    """

    one_client_per_request: ClassVar[bool] = True

    @abstractmethod
    def method(self) -> ClientMethod:
        """The client-side method and its settings, as the client receives them."""

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        if len(request.clients) != 1:
            raise ValueError(
                f"{self.name} unlearning removes exactly one client per request, because it runs on that "
                f"client's own data; got {sorted(request.clients)}. Unlearn them one at a time, or use a strategy "
                "that removes several at once (retrain, calibrated, subtract)"
            )
        (client,) = request.clients
        completed = request.completed_rounds
        info = self.trajectory_info(request)
        if first_contribution(history, [client], completed) is None:
            return nothing_to_unlearn(history, federation, completed, info)
        rounds: int = self.settings.recovery_rounds  # type: ignore[attr-defined]
        model, client_epochs = federation.client_unlearning(client, history.model(completed), self.method())
        model, _ = recover_and_record(
            federation, model, completed, info,
            rounds=rounds, epochs=self.context.local_epochs, withdrawn=frozenset({client}),
        )
        return UnlearningOutcome(
            model=model,
            rounds_replayed=rounds,
            base_version=completed - 1,
            details={"client_epochs_unlearning": float(client_epochs), "recovery_rounds": rounds},
        )
