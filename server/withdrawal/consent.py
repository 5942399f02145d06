"""Where the round loop learns that a client withdrew, and where it reports back.

In a federation that is the consent registry, filled by the withdrawal
service from clients' signed requests. A schedule of withdrawals serves the
Python API and in-process tests that run no service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedforget.server.withdrawal.registry import ConsentRegistry


@dataclass(frozen=True)
class Withdrawal:
    """Client ``client_id`` withdraws before round ``round``: it trained in rounds ``1..round-1`` at most."""

    client_id: str
    round: int


CLIENT_INITIATED = "client"
"""The client asked: a signed withdrawal request from its own key."""
OPERATOR_INITIATED = "operator"
"""The federation's operator ordered the erasure, for a stated reason; the client signed nothing."""


@dataclass(frozen=True)
class WithdrawalNotice:
    """A withdrawal the loop must act on now, and who initiated it.

    A client-initiated notice carries the client's signed ``request``; an
    operator-initiated one carries the operator's ``reason`` instead.
    """

    client_id: str
    request_id: str | None = None
    request: dict[str, object] | None = None
    initiated_by: str = CLIENT_INITIATED
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.initiated_by == CLIENT_INITIATED and self.request is None:
            raise ValueError(f"a client-initiated withdrawal of {self.client_id!r} needs the client's signed request")
        if self.initiated_by == OPERATOR_INITIATED and not self.reason:
            raise ValueError(f"an operator-initiated erasure of {self.client_id!r} needs a reason")
        if self.initiated_by not in (CLIENT_INITIATED, OPERATOR_INITIATED):
            raise ValueError(f"initiated_by must be {CLIENT_INITIATED!r} or {OPERATOR_INITIATED!r}, got {self.initiated_by!r}")

    @classmethod
    def by_operator(cls, client_id: str, reason: str) -> WithdrawalNotice:
        """An erasure the operator orders, with no request from the client."""
        return cls(client_id=client_id, initiated_by=OPERATOR_INITIATED, reason=reason)


class ConsentSource(Protocol):
    """Withdrawals due at a round boundary, and what became of them."""

    def due(self, server_round: int, already_withdrawn: set[str]) -> list[WithdrawalNotice]: ...

    def started(self, notices: Sequence[WithdrawalNotice]) -> None: ...

    def finished(self, notice: WithdrawalNotice, certificate: Path | None) -> None: ...

    def failed(self, notice: WithdrawalNotice, reason: str) -> None: ...


class ScheduledWithdrawals:
    """Withdrawals fixed in advance (``CLIENT@ROUND``), for the Python API and tests."""

    def __init__(self, withdrawals: Sequence[Withdrawal]) -> None:
        self.withdrawals = sorted(withdrawals, key=lambda w: (w.round, w.client_id))

    def due(self, server_round: int, already_withdrawn: set[str]) -> list[WithdrawalNotice]:
        return [
            WithdrawalNotice.by_operator(w.client_id, f"scheduled withdrawal before round {w.round}")
            for w in self.withdrawals
            if w.round <= server_round and w.client_id not in already_withdrawn
        ]

    def started(self, notices: Sequence[WithdrawalNotice]) -> None:
        pass

    def finished(self, notice: WithdrawalNotice, certificate: Path | None) -> None:
        pass

    def failed(self, notice: WithdrawalNotice, reason: str) -> None:
        pass


class RegistryConsent:
    """Signed requests accepted by the withdrawal service, read between rounds.

    Requests a crash left in "unlearning" are due again: the unlearning they
    started is redone from its start. A request from a client that was already
    unlearned (the run says so, or the registry holds a completed request of
    it) is never due: it is closed as ``already-withdrawn``, pointing to the
    original certificate.
    """

    def __init__(self, registry_path: Path) -> None:
        self.registry_path = registry_path

    def due(self, server_round: int, already_withdrawn: set[str]) -> list[WithdrawalNotice]:
        with ConsentRegistry.open(self.registry_path) as registry:
            withdrawn = set(already_withdrawn) | registry.withdrawn_clients()
            requests = registry.pending() + [r for r in registry.requests() if r.status == "unlearning"]
            for request in [r for r in requests if r.client_id in withdrawn]:
                registry.close_as_already_withdrawn(request.request_id)
            requests = [r for r in requests if r.client_id not in withdrawn]
        return [
            WithdrawalNotice(
                client_id=r.client_id,
                request_id=r.request_id,
                request={"document": r.document, "signature": r.signature, "request_hash": r.request_hash},
            )
            for r in sorted(requests, key=lambda r: r.received_at)
        ]

    def started(self, notices: Sequence[WithdrawalNotice]) -> None:
        self._mark(notices, "unlearning")

    def finished(self, notice: WithdrawalNotice, certificate: Path | None) -> None:
        self._mark([notice], "done", certificate=None if certificate is None else str(certificate))

    def failed(self, notice: WithdrawalNotice, reason: str) -> None:
        self._mark([notice], "failed", reason=reason)

    def _mark(self, notices: Sequence[WithdrawalNotice], status: str, **details: object) -> None:
        with ConsentRegistry.open(self.registry_path) as registry:
            for notice in notices:
                if notice.request_id is None:
                    continue
                current = registry.status(notice.request_id)
                if current is not None and current.status != status:
                    registry.mark(notice.request_id, status, **details)  # type: ignore[arg-type]


class ShardConsent:
    """One shard's view of a federation's consent source: only its own clients' withdrawals are due.

    A sharded deployment has one withdrawal service and one registry; each
    shard's round loop must act on its clients' requests alone, or it would
    "unlearn" a client it never trained.
    """

    def __init__(self, inner: ConsentSource, clients: frozenset[str]) -> None:
        self.inner = inner
        self.clients = clients

    def due(self, server_round: int, already_withdrawn: set[str]) -> list[WithdrawalNotice]:
        return [n for n in self.inner.due(server_round, already_withdrawn) if n.client_id in self.clients]

    def started(self, notices: Sequence[WithdrawalNotice]) -> None:
        self.inner.started(notices)

    def finished(self, notice: WithdrawalNotice, certificate: Path | None) -> None:
        self.inner.finished(notice, certificate)

    def failed(self, notice: WithdrawalNotice, reason: str) -> None:
        self.inner.failed(notice, reason)
