"""A sharded deployment (run config ``shards``), driven in process over named (deployed) nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_grid import LocalGrid

from fedforget.client.app import make_client_app
from fedforget.identity import generate_keypair
from fedforget.run_config import DeploymentConfig, RunConfigError
from fedforget.server.deployment import run_deployment
from fedforget.server.store.errors import FedforgetError
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.withdrawal.consent import ScheduledWithdrawals, ShardConsent, Withdrawal
from fedforget.sharding import load_assignment
from fedforget.simulations.task import DataSettings, SimulationTask

ORGANISATIONS = ["org-a", "org-b", "org-c", "org-d", "org-e"]


def settings(tmp_path: Path, **extra: object) -> dict[str, object]:
    if not (tmp_path / "federation.key").exists():
        generate_keypair(tmp_path / "federation.key", tmp_path / "federation.pub")
    return {
        "state-dir": str(tmp_path / "state"), "federation-id": "fed", "signing-key": str(tmp_path / "federation.key"),
        "num-rounds": 2, "min-nodes": len(ORGANISATIONS), "shards": 2, **extra,
    }


def named_grid() -> LocalGrid:
    task = SimulationTask(DataSettings(dataset="digits", num_clients=len(ORGANISATIONS), seed=0))
    return LocalGrid(make_client_app(task), len(ORGANISATIONS), names=dict(enumerate(ORGANISATIONS)))


def test_a_sharded_deployment_forms_its_shards_from_the_connected_organisations_and_serves_the_ensemble(tmp_path):
    config = DeploymentConfig.from_run_config(settings(tmp_path))
    run_deployment(named_grid(), config)
    assignment = load_assignment(tmp_path / "state" / "shards.json")
    assert sorted(assignment.clients) == ORGANISATIONS and assignment.count == 2
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert [s["clients"] for s in report["shards"]] == [list(s) for s in assignment.shards]
    assert 0.0 <= report["final_test_accuracy"] <= 1.0
    for index, members in enumerate(assignment.shards):
        shard = tmp_path / "state" / "shards" / f"shard-{index}"
        with HistoryStore.open(shard / "store", readonly=True) as store:
            assert store.last_completed_round() == 2
            assert {p.client_id for view in store.reader().rounds() for p in view.participants} == set(members)
        assert (shard / "state" / "ledger.jsonl").exists() and (shard / "report.json").exists()

    # A resume keeps the shards; another shard count, or a new run over this state, is refused.
    with pytest.raises(FedforgetError, match="resume with shards=2"):
        run_deployment(named_grid(), DeploymentConfig.from_run_config(settings(tmp_path, resume=True, shards=3)))
    with pytest.raises(FedforgetError, match="already holds a sharded run"):
        run_deployment(named_grid(), config)
    before = (tmp_path / "state" / "shards.json").read_text()
    run_deployment(named_grid(), DeploymentConfig.from_run_config(settings(tmp_path, resume=True)))
    assert (tmp_path / "state" / "shards.json").read_text() == before


def test_more_shards_than_min_nodes_is_refused_in_the_run_config(tmp_path):
    with pytest.raises(RunConfigError, match=r"shards \(6\) must be at most min-nodes \(5\)"):
        DeploymentConfig.from_run_config(settings(tmp_path, shards=6))
    with pytest.raises(RunConfigError, match="shards must be at least 1"):
        DeploymentConfig.from_run_config(settings(tmp_path, shards=0))


def test_a_shard_sees_only_its_own_clients_withdrawals():
    inner = ScheduledWithdrawals([Withdrawal("org-a", 2), Withdrawal("org-c", 2)])
    shard = ShardConsent(inner, frozenset({"org-b", "org-c"}))
    assert [n.client_id for n in shard.due(2, set())] == ["org-c"]
    assert shard.due(1, set()) == [] and shard.due(2, {"org-c"}) == []
    assert [n.client_id for n in inner.due(2, set())] == ["org-a", "org-c"]
