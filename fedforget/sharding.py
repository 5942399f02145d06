"""Which shard each client trains in: the one rule every sharded (SISA-style) federation uses.

A sharded federation splits its clients into K isolated shards; each shard
trains its own model over its own clients only, and the served model combines
the shard models. A withdrawal then touches one shard: only its model holds
the client, so only it must be retrained (Bourtoule et al., "Machine
Unlearning", IEEE S&P 2021).

The assignment is a pure function of (clients, K, seed, data sizes), so a
resumed run recomputes the same one; it is also written next to the shard
stores (``shards.json``), and a resume refuses a saved assignment that differs
from the rule's, so the audit and the run always read the same shards.

The rule, balanced by data size (the greedy "longest processing time first"
schedule): shuffle the clients with a generator seeded by ``seed``, stably
sort them by decreasing example count, then give each in turn to the shard
holding the fewest examples so far (ties: fewer clients, then the lower
index). Without sizes every client counts one example, which is round-robin
over the shuffled order. Every shard gets at least one client when K ≤ N.

Torch- and Flower-free: the CLI checks ``--shards`` before importing either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedforget.errors import FedforgetError
from fedforget.files import write_json_atomic

SHARDS_FILE = "shards.json"
SHARDS_DIR = "shards"
ASSIGNMENT_RULE = "balanced-by-examples-v1"


class ShardingError(FedforgetError, ValueError):
    """A shard count or assignment that cannot be used; the message says what would work."""


def check_shard_count(shards: int, clients: int, option: str = "--shards") -> None:
    """Refuse K < 1 or K greater than the number of clients (a shard without clients trains nothing)."""
    if shards < 1:
        raise ShardingError(f"{option} must be at least 1 (1 is an unsharded federation), got {shards}")
    if shards > clients:
        raise ShardingError(
            f"{option} {shards} is more than the {clients} clients: every shard needs at least one client; "
            f"choose {option} between 1 and {clients}"
        )


class ClientInNoShardError(ShardingError):
    """A client id that no shard holds (a typo, or an organisation that joined after the shards were formed)."""


@dataclass(frozen=True)
class ShardAssignment:
    """The K shards, each a sorted tuple of client ids, and the inputs of the rule that made them."""

    seed: int
    shards: tuple[tuple[str, ...], ...]
    examples: Mapping[str, int]
    """Examples per client the rule balanced by (1 each when the sizes were not given)."""

    @property
    def count(self) -> int:
        return len(self.shards)

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(sorted((c for shard in self.shards for c in shard), key=_client_order))

    def shard_of(self, client: str) -> int:
        """The index of the shard ``client`` trains in; an unknown client is an error naming the known ones."""
        for index, members in enumerate(self.shards):
            if client in members:
                return index
        raise ClientInNoShardError(f"client {client!r} is in no shard; the shards hold {', '.join(self.clients)}")

    def scope(self, index: int) -> dict[str, object]:
        """What the ledger and the certificates of shard ``index`` state about it: which shard, of how many, whose."""
        return {"index": index, "count": self.count, "clients": list(self.shards[index])}

    def to_json(self) -> dict[str, object]:
        return {
            "rule": ASSIGNMENT_RULE,
            "seed": self.seed,
            "shards": [list(members) for members in self.shards],
            "examples": dict(sorted(self.examples.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ShardAssignment:
        if data.get("rule") != ASSIGNMENT_RULE:
            raise ShardingError(f"unknown shard assignment rule {data.get('rule')!r}; expected {ASSIGNMENT_RULE!r}")
        shards = tuple(tuple(str(c) for c in members) for members in data["shards"])  # type: ignore[attr-defined]
        examples = {str(k): int(v) for k, v in dict(data["examples"]).items()}  # type: ignore[call-overload]
        return cls(seed=int(data["seed"]), shards=shards, examples=examples)  # type: ignore[call-overload]


def assign_shards(
    clients: Sequence[str], shards: int, seed: int, examples: Mapping[str, int] | None = None
) -> ShardAssignment:
    """Split ``clients`` into ``shards`` shards balanced by ``examples`` (see the module docstring)."""
    names = sorted(dict.fromkeys(str(c) for c in clients), key=_client_order)  # the caller's order does not matter
    if len(names) != len(clients):
        raise ShardingError("a client is listed more than once")
    check_shard_count(shards, len(names))
    sizes = {c: 1 for c in names} if examples is None else {c: int(examples[c]) for c in names}
    if any(size < 1 for size in sizes.values()):
        raise ShardingError(f"every client needs at least one example to be balanced by, got {sizes}")
    order = [names[i] for i in np.random.default_rng([seed, 0x5A4D]).permutation(len(names))]
    order.sort(key=lambda c: -sizes[c])  # stable: equal sizes keep the seeded order
    members: list[list[str]] = [[] for _ in range(shards)]
    totals = [0] * shards
    for client in order:
        target = min(range(shards), key=lambda i: (totals[i], len(members[i]), i))
        members[target].append(client)
        totals[target] += sizes[client]
    return ShardAssignment(
        seed=seed, shards=tuple(tuple(sorted(m, key=_client_order)) for m in members), examples=sizes
    )


SHARD_META = "shard"
"""The history-store meta key under which a shard's store keeps its scope (:meth:`ShardAssignment.scope`)."""


class _MetaStore(Protocol):
    def get_meta(self, key: str, default: object = None) -> object: ...


def shard_scope(store: _MetaStore) -> dict[str, object] | None:
    """The scope a shard's history store was created with; None for an unsharded federation's store.

    Kept in the store, not passed around, so every path that unlearns from it
    (the round loop, ``fedforget unlearn --state``, a user's ServerApp) states
    the same shard in the ledger.
    """
    scope = store.get_meta(SHARD_META)
    return dict(scope) if isinstance(scope, dict) else None


def _client_order(client: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order (2 before 10), other names after them alphabetically."""
    return (0, int(client)) if client.isdigit() else (1, client)


def shard_dir(root: Path, index: int) -> Path:
    """Shard ``index``'s own state directory under a sharded run's ``root`` (simulation OUT or deployment state-dir)."""
    return root / SHARDS_DIR / f"shard-{index}"


def save_assignment(path: Path, assignment: ShardAssignment) -> None:
    write_json_atomic(path, assignment.to_json())


def load_assignment(path: Path) -> ShardAssignment:
    try:
        return ShardAssignment.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardingError(f"cannot read the shard assignment {path}: {exc}") from exc


def settle_assignment(path: Path, computed: ShardAssignment) -> ShardAssignment:
    """Write ``computed`` to ``path``, or check the one already there is the same (a resumed run).

    A saved assignment that differs means the federation's shards changed
    under its stores: refused, since a client would then be unlearned from the
    wrong shard.
    """
    if not path.exists():
        save_assignment(path, computed)
        return computed
    saved = load_assignment(path)
    if saved != computed:
        raise ShardingError(
            f"the shard assignment in {path} ({[list(s) for s in saved.shards]}) is not the one this run's "
            f"settings give ({[list(s) for s in computed.shards]}); resume with the settings the run began with"
        )
    return saved
