"""Several shards of one federation advancing round by round together (a sharded, SISA-style federation).

Each shard is a :class:`~fedforget.server.rounds.loop.FederatedRun` of its own
clients, with its own history store, over a
:class:`~fedforget.server.rounds.grids.ShardGrid`. Driving them in lockstep
means a withdrawal, whenever it arrives, is acted on in its shard before that
shard's next round, as in an unsharded run; the other shards never wait for
an unlearning that is not theirs beyond the round in progress.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from fedforget.arrays import Arrays
from fedforget.server.rounds.loop import FederatedRun, RunOutcome


class ShardedRun:
    """Run rounds ``k+1..num_rounds`` of every shard, round ``t`` of each shard before round ``t+1`` of any."""

    def __init__(self, shards: Sequence[FederatedRun]) -> None:
        if not shards:
            raise ValueError("a sharded run needs at least one shard")
        rounds = {run.settings.num_rounds for run in shards}
        if len(rounds) != 1:
            raise ValueError(f"every shard must run the same number of rounds, got {sorted(rounds)}")
        self.shards = list(shards)
        self.num_rounds = rounds.pop()

    def execute(self, initial_model: Arrays) -> list[RunOutcome]:
        """Train every shard to ``num_rounds`` from ``initial_model`` (or from where its store stopped).

        Whatever ends the run, each shard's recorded rounds are committed
        before this returns or raises, so every store is ready to resume from.
        """
        try:
            completed = [run.start(initial_model) for run in self.shards]
            for server_round in range(min(completed) + 1, self.num_rounds + 1):
                for run, done in zip(self.shards, completed):
                    if server_round > done:
                        run.run_round(server_round)
            return [run.finish() for run in self.shards]
        except BaseException:
            for run in self.shards:
                with contextlib.suppress(Exception):  # the original error matters more
                    run.strategy.flush()
            raise
