"""Audit queries over the ledger: which model versions contain a client's contribution, and which no longer do."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fedforget.server.ledger.entries import LedgerError, validate_body
from fedforget.server.ledger.log import Ledger

__all__ = ["ClientAudit", "client_history"]


@dataclass(frozen=True)
class ClientAudit:
    """What the ledger says about one client's contribution. See :func:`client_history`.

    Versions are ``(trajectory, version)`` pairs; version ``v`` is the global
    model after round ``v`` (version 0, the initial model, contains nobody and
    is never listed).
    """

    client: str
    participated: list[tuple[int, int]]
    """Rounds whose ledger entry lists the client: ``(trajectory, round)``."""
    contained: list[tuple[int, int]]
    """Every model version the ledger knows of that contains the client's contribution."""
    not_contained: list[tuple[int, int]]
    """Every other model version the ledger knows of (never had it, or it was removed)."""
    removed_by: list[dict]
    """The unlearning entries naming the client: their body plus ``index`` and ``timestamp``."""
    clean_versions: list[tuple[int, int]]
    """``(trajectory, from_version)`` per unlearning that removed the client: that trajectory's
    versions from ``from_version`` on were produced without it (unless the client took part
    again later, in which case those later versions are in ``contained``)."""
    withdrawal_requests: list[dict] = field(default_factory=list)
    """The client's withdrawal-request entries (body plus ``index`` and ``timestamp``)."""
    keys_destroyed: list[dict] = field(default_factory=list)
    """Each destruction of the client's data key once: its key-destroyed entries (in ledgers written before
    those existed, the unlearnings with ``key_destroyed``)."""

    def contains(self, trajectory: int, version: int) -> bool | None:
        """True / False for a version the ledger knows of, None for one it does not."""
        if (trajectory, version) in self.contained:
            return True
        if (trajectory, version) in self.not_contained:
            return False
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "participated": [list(v) for v in self.participated],
            "contained": [list(v) for v in self.contained],
            "not_contained": [list(v) for v in self.not_contained],
            "removed_by": self.removed_by,
            "clean_versions": [list(v) for v in self.clean_versions],
            "withdrawal_requests": self.withdrawal_requests,
            "keys_destroyed": self.keys_destroyed,
        }


@dataclass
class _Fork:
    index: int
    trajectory: int
    source: int
    base: int | None  # as recorded
    unlearned: int  # version of the new trajectory holding the unlearned model (round - 1)
    clients: frozenset[str]


def client_history(ledger: Ledger, client: str) -> ClientAudit:
    """Which model versions contain ``client``'s contribution, and which no longer do.

    Reads (and so verifies) the whole chain. The rules, per trajectory ``T``:

    * A round entry of ``T`` listing the client makes that version and every
      later version of ``T`` contain it.
    * A trajectory created by an unlearning (from source ``P``, sharing
      versions ``0..b`` with it, unlearned model at version ``u = round - 1``)
      shares ``P``'s versions ``1..b`` and so contains the client where ``P``
      does. Its versions after ``b`` were produced by the unlearning from
      ``P``'s history: without the client if the unlearning removed it;
      otherwise they are counted as containing it whenever ``P``'s version
      ``u`` does (conservative: derived from a model that held it).
      If ``u == b`` (nothing new was produced) the fork continues ``P``'s version ``b``.
    * ``b`` is the recorded ``base_version``; when it was not recorded, the
      version before the new trajectory's first round entry, but at most
      ``u - 1`` (conservative: assume shared what the ledger cannot show was rebuilt).
    * A trajectory no unlearning entry created is a root: only its own
      round entries count.

    Known versions are those with a round entry, the versions ``1..u`` of
    each unlearning's source and new trajectory, and shared versions. The
    ledger must be complete since the federation started for the answer
    to be complete.
    """
    if not isinstance(client, str) or not client:
        raise ValueError(f"client must be a non-empty string, got {client!r}")
    logged: dict[int, set[int]] = defaultdict(set)
    first_direct: dict[int, int] = {}
    participated: list[tuple[int, int]] = []
    forks: dict[int, _Fork] = {}
    source_versions: dict[int, int] = defaultdict(int)
    removed_by: list[dict] = []
    removing: list[_Fork] = []
    requests: list[dict] = []
    destroyed: list[dict] = []
    unlearning_destroyed: list[dict] = []  # ledgers written before key-destroyed entries existed say it here
    for entry in ledger.entries():
        if entry.kind not in ("round", "unlearning", "withdrawal-request", "key-destroyed"):
            continue
        body = entry.body
        try:
            validate_body(entry.kind, body)
        except ValueError as exc:
            raise LedgerError(f"ledger {ledger.path} entry {entry.index} ({entry.kind}) is malformed: {exc}") from None
        if entry.kind == "round":
            traj, rnd = body["trajectory"], body["round"]
            logged[traj].add(rnd)
            if any(p["client"] == client for p in body["participants"]):
                participated.append((traj, rnd))
                first_direct[traj] = min(first_direct.get(traj, rnd), rnd)
        elif entry.kind == "unlearning":
            traj = body["trajectory"]
            if traj in forks:
                raise LedgerError(
                    f"ledger {ledger.path}: entries {forks[traj].index} and {entry.index} both record an "
                    f"unlearning that created trajectory {traj}"
                )
            fork = _Fork(
                entry.index,
                traj,
                body["source_trajectory"],
                body.get("base_version"),
                body["round"] - 1,
                frozenset(body["clients"]),
            )
            forks[traj] = fork
            source_versions[fork.source] = max(source_versions[fork.source], fork.unlearned)
            if client in fork.clients:
                removed_by.append(entry.with_position())
                removing.append(fork)
                if body["key_destroyed"]:
                    unlearning_destroyed.append({"kind": entry.kind, **entry.with_position()})
        elif body["client"] == client:
            if entry.kind == "withdrawal-request":
                requests.append(entry.with_position())
            else:
                destroyed.append({"kind": entry.kind, **entry.with_position()})

    base: dict[int, int] = {}
    for traj, fork in forks.items():
        b = fork.base
        if b is None:
            b = fork.unlearned - 1
            if logged[traj]:
                b = min(b, min(logged[traj]) - 1)
        base[traj] = max(0, min(b, fork.unlearned))

    memo: dict[tuple[int, int], bool] = {}

    def contains(traj: int, version: int) -> bool:
        if version <= 0:
            return False
        key = (traj, version)
        if key not in memo:
            first = first_direct.get(traj)
            result = first is not None and first <= version
            fork = forks.get(traj)
            if not result and fork is not None:  # fork.source < traj: the recursion ends
                b = base[traj]
                if version <= b:
                    result = contains(fork.source, version)
                elif fork.unlearned == b:
                    result = contains(fork.source, b)
                else:
                    result = client not in fork.clients and contains(fork.source, fork.unlearned)
            memo[key] = result
        return memo[key]

    known: dict[int, set[int]] = defaultdict(set)
    for traj, rounds in logged.items():
        known[traj] |= rounds
    for traj, fork in forks.items():
        known[traj] |= set(range(1, fork.unlearned + 1))
    for traj, top in source_versions.items():
        known[traj] |= set(range(1, top + 1))
    contained, not_contained = [], []
    for traj in sorted(known):
        for version in sorted(known[traj]):
            (contained if contains(traj, version) else not_contained).append((traj, version))
    clean = []
    for fork in removing:
        start = base[fork.trajectory] + 1
        if not contains(fork.trajectory, start):
            clean.append((fork.trajectory, start))
    return ClientAudit(
        client=client,
        participated=participated,
        contained=contained,
        not_contained=not_contained,
        removed_by=removed_by,
        clean_versions=clean,
        withdrawal_requests=requests,
        keys_destroyed=destroyed or unlearning_destroyed,
    )
