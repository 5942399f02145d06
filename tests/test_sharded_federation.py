"""Sharded federations on the Flower layer (server/app.py with ServerSetup.clients, ShardGrid), in process.

Each shard is a federation of its own clients over the same Grid; a
withdrawal is unlearned in its shard alone, and an exact retrain there is bit
for bit what training the shard without the client produces.
"""

from __future__ import annotations

import random
from dataclasses import replace
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from flower_fixtures import TRAIN_CONFIG, initial_model
from local_grid import LocalGrid

from fedforget.client.app import make_client_app
from fedforget.server.app import ServerSetup, run_federation, run_sharded_federation
from fedforget.server.rounds.loop import RunOutcome, RunSettings, SilentObserver, Withdrawal
from fedforget.server.store.history_store import HistoryStore
from fedforget.sharding import ShardAssignment, assign_shards
from fedforget.simulations.task import DataSettings, SimulationTask
from fedforget.strategies.registry import StrategyChoice

CLIENTS = 8
ROUNDS = 4


class ShufflingGrid(LocalGrid):
    """Replies in a random order, as Flower's engines return them."""

    def __init__(self, *args: object, seed: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rng = random.Random(seed)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self._rng.shuffle(replies)
        return replies


def make_grid(seed: int = 0) -> LocalGrid:
    task = SimulationTask(DataSettings(dataset="digits", num_clients=CLIENTS, seed=0))
    return ShufflingGrid(make_client_app(task), CLIENTS, seed=seed)


def shard_setup(
    store_dir: Path, clients: Iterable[str], *, withdrawals: Sequence[Withdrawal] = (), strategy: str = "retrain"
) -> ServerSetup:
    members = frozenset(clients)
    return ServerSetup(
        store_dir=store_dir,
        federation_id=f"shard-of-{'-'.join(sorted(members))}",
        initial_model=initial_model(),
        settings=RunSettings(num_rounds=ROUNDS, train_config=dict(TRAIN_CONFIG), expected_clients=len(members)),
        strategy=StrategyChoice(strategy),
        withdrawals=withdrawals,
        clients=members,
    )


def run_shard(grid: LocalGrid, store_dir: Path, clients: Iterable[str], **kwargs: object) -> RunOutcome:
    """One shard on its own (the independent trainings the sharded run is compared with)."""
    return run_federation(grid, shard_setup(store_dir, clients, **kwargs))  # type: ignore[arg-type]


def assignment() -> ShardAssignment:
    return assign_shards([str(c) for c in range(CLIENTS)], 2, seed=0)


def run_sharded(tmp_path: Path, grid: LocalGrid, withdrawn: str, strategy: str) -> list[Path]:
    """Both shards in lockstep, the withdrawing client's before round 3; returns each shard's store directory."""
    setups = [
        shard_setup(
            tmp_path / f"shard-{index}", members, strategy=strategy,
            withdrawals=[Withdrawal(withdrawn, 3)] if withdrawn in members else [],
        )
        for index, members in enumerate(assignment().shards)
    ]
    outcomes = run_sharded_federation(grid, setups)
    assert [len(o.timeline) for o in outcomes] == [ROUNDS, ROUNDS]
    return [setup.store_dir for setup in setups]


class RoundOrder(SilentObserver):
    """Records which shard starts which round, in order."""

    def __init__(self, shard: int, log: list[tuple[int, int]]) -> None:
        self.shard, self.log = shard, log

    def round_starting(self, server_round: int) -> None:
        self.log.append((server_round, self.shard))


def test_shards_advance_in_lockstep(tmp_path):
    order: list[tuple[int, int]] = []
    setups = [
        replace(shard_setup(tmp_path / f"shard-{index}", members), observer=RoundOrder(index, order))
        for index, members in enumerate(assignment().shards)
    ]
    run_sharded_federation(make_grid(), setups)
    assert order == [(r, shard) for r in range(1, ROUNDS + 1) for shard in (0, 1)]


def participants(store_dir: Path) -> dict[int, set[str]]:
    """Who took part in each trajectory's own rounds."""
    with HistoryStore.open(store_dir, readonly=True) as store:
        return {
            info.id: {p.client_id for view in store.reader(info.id).rounds() for p in view.participants}
            for info in store.trajectories()
        }


def final_model(store_dir: Path) -> dict[str, np.ndarray]:
    with HistoryStore.open(store_dir, readonly=True) as store:
        return store.read_model(ROUNDS)


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_each_shard_trains_only_its_clients_and_a_withdrawal_leaves_the_other_shards_untouched(tmp_path):
    shards = assignment().shards
    withdrawn = shards[0][0]
    grid = make_grid()
    stores = run_sharded(tmp_path / "sharded", grid, withdrawn, "retrain")
    for members, store_dir in zip(shards, stores):
        for trajectory, clients in participants(store_dir).items():
            assert clients <= set(members), (store_dir, trajectory, clients)
    assert participants(stores[0])[2] == set(shards[0]) - {withdrawn}  # the retrained trajectory
    with HistoryStore.open(stores[1], readonly=True) as other:
        assert [t.id for t in other.trajectories()] == [1]  # no fork, no unlearning
    # The untouched shard holds exactly what it holds in a federation where nobody withdraws.
    alone = run_shard(make_grid(seed=1), tmp_path / "alone", shards[1])
    assert_bitwise_equal(final_model(stores[1]), alone.model)


def test_a_shard_retrain_is_bit_for_bit_the_shard_trained_without_the_client(tmp_path):
    members = assignment().shards[0]
    withdrawn = members[0]
    stores = run_sharded(tmp_path / "sharded", make_grid(seed=0), withdrawn, "retrain")
    with HistoryStore.open(stores[0], readonly=True) as store:
        (event,) = [t.info for t in store.trajectories() if t.status == "complete"]
        assert event["strategy"] == "retrain" and event["base_version"] == 0 and event["rounds_replayed"] == 2
        unlearned_version_2 = store.read_model(2)
    # Independently, with other reply orders: the shard's remaining clients, same seeds, from the same initial model.
    independent_dir = tmp_path / "independent"
    run_shard(make_grid(seed=7), independent_dir, set(members) - {withdrawn})
    with HistoryStore.open(independent_dir, readonly=True) as independent:
        assert_bitwise_equal(unlearned_version_2, independent.read_model(2))
        assert_bitwise_equal(final_model(stores[0]), independent.read_model(ROUNDS))


@pytest.mark.parametrize("strategy", ["calibrated", "subtract"])
def test_approximate_strategies_unlearn_within_the_shard(tmp_path, strategy):
    shards = assignment().shards
    withdrawn = shards[0][0]
    stores = run_sharded(tmp_path / "sharded", make_grid(), withdrawn, strategy)
    with HistoryStore.open(stores[0], readonly=True) as store:
        (event,) = [t.info for t in store.trajectories() if t.status == "complete"]
        assert event["strategy"] == strategy and event["clients"] == [withdrawn]
        after = {p.client_id for view in store.reader().rounds(3) for p in view.participants}
        assert after == set(shards[0]) - {withdrawn}
        assert not same(store.read_model(ROUNDS), store.reader(1).model(2))
    with HistoryStore.open(stores[1], readonly=True) as other:
        assert [t.id for t in other.trajectories()] == [1]
    alone = run_shard(make_grid(seed=1), tmp_path / "alone", shards[1])
    assert_bitwise_equal(final_model(stores[1]), alone.model)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[name], b[name]) for name in a)


def test_a_shard_refuses_another_shards_withdrawal(tmp_path):
    shards = assignment().shards
    with pytest.raises(ValueError, match="give each shard only its own clients' withdrawals"):
        run_shard(make_grid(), tmp_path / "s", shards[0], withdrawals=[Withdrawal(shards[1][0], 2)])
    assert not (tmp_path / "s").exists()


def test_a_shard_whose_last_client_withdraws_is_emptied_exactly_and_leaves_the_served_ensemble(tmp_path):
    """The run's strategy is approximate, but nobody is left for it to recover with: the shard is emptied exactly."""
    setups = [shard_setup(tmp_path / "alone", ["0"], withdrawals=[Withdrawal("0", 3)], strategy="subtract"),
              shard_setup(tmp_path / "rest", ["1", "2"])]
    alone, rest = run_sharded_federation(make_grid(), setups)
    assert (alone.served, rest.served) == (False, True)
    assert [e["round"] for e in rest.timeline] == list(range(1, ROUNDS + 1))  # the other shard trains on
    (event,) = alone.unlearning
    assert (event["clients"], event["strategy"], event["residual_clients"]) == (["0"], "empty-shard", [])
    with HistoryStore.open(tmp_path / "alone", readonly=True) as store:
        emptied = store.current_trajectory()
        assert store.last_completed_round() == 2  # no round after the withdrawal: nobody to train
        reader = store.reader(emptied)
        assert all(not r.participants for r in reader.rounds())
        assert all(np.array_equal(v, initial_model()[k]) for k, v in reader.model(2).items())
        assert all(np.array_equal(v, initial_model()[k]) for k, v in alone.model.items())
    # A resumed run keeps the shard empty: nothing retrains it, and nothing waits for its client.
    resumed = run_sharded_federation(make_grid(), [replace(s, resume=True) for s in setups])
    assert [o.served for o in resumed] == [False, True] and resumed[0].unlearning == alone.unlearning
