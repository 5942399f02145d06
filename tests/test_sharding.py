"""The client -> shard assignment of a sharded federation (fedforget/sharding.py)."""

from __future__ import annotations

import json

import pytest

from fedforget.sharding import (
    ShardAssignment,
    ShardingError,
    assign_shards,
    load_assignment,
    settle_assignment,
)

CLIENTS = [str(c) for c in range(10)]


def test_the_assignment_is_a_function_of_its_inputs_so_a_resume_gets_the_same_shards():
    sizes = {c: 100 + 7 * int(c) for c in CLIENTS}
    first = assign_shards(CLIENTS, 4, seed=3, examples=sizes)
    assert assign_shards(list(reversed(CLIENTS)), 4, seed=3, examples=sizes) == first  # input order is irrelevant
    assert ShardAssignment.from_json(json.loads(json.dumps(first.to_json()))) == first
    assert assign_shards(CLIENTS, 4, seed=4, examples=sizes) != first  # the seed matters


def test_every_client_is_in_exactly_one_shard_and_no_shard_is_empty():
    for shards in range(1, len(CLIENTS) + 1):
        assignment = assign_shards(CLIENTS, shards, seed=0)
        members = [c for shard in assignment.shards for c in shard]
        assert sorted(members, key=int) == CLIENTS and len(set(members)) == len(CLIENTS)
        assert assignment.count == shards and all(assignment.shards)
        for index, shard in enumerate(assignment.shards):
            assert all(assignment.shard_of(c) == index for c in shard)


def test_shards_are_balanced_by_examples():
    sizes = {"0": 900, "1": 500, "2": 400, "3": 300, "4": 300, "5": 100}
    assignment = assign_shards(list(sizes), 2, seed=0, examples=sizes)
    totals = sorted(sum(sizes[c] for c in shard) for shard in assignment.shards)
    assert totals == [1200, 1300]  # greedy: 900+300+100 / 500+400+300 (perfect: 1250 each)
    # Without sizes, shard sizes differ by at most one client.
    counts = [len(s) for s in assign_shards(CLIENTS, 4, seed=0).shards]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(("shards", "message"), [(0, "at least 1"), (-2, "at least 1"), (11, "more than the 10 clients")])
def test_a_shard_count_outside_1_to_the_number_of_clients_is_refused(shards, message):
    with pytest.raises(ShardingError, match=message):
        assign_shards(CLIENTS, shards, seed=0)


def test_an_unknown_client_has_no_shard():
    with pytest.raises(ShardingError, match="client '42' is in no shard"):
        assign_shards(CLIENTS, 2, seed=0).shard_of("42")


def test_a_saved_assignment_is_kept_and_a_different_one_is_refused(tmp_path):
    path = tmp_path / "shards.json"
    assignment = assign_shards(CLIENTS, 3, seed=0)
    assert settle_assignment(path, assignment) == assignment
    assert load_assignment(path) == assignment
    assert settle_assignment(path, assign_shards(CLIENTS, 3, seed=0)) == assignment  # a resume
    with pytest.raises(ShardingError, match="resume with the settings the run began with"):
        settle_assignment(path, assign_shards(CLIENTS, 3, seed=1))
    assert load_assignment(path) == assignment  # unchanged by the refusal
