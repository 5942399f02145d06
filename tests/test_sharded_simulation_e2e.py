"""`fedforget simulate --shards K` end to end on Flower's simulation engine (Ray).

One session trains every shard; the report, the evidence and the published
models are those of the served ensemble, and the withdrawal touched its
shard's history alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedforget.arrays import load_arrays
from fedforget.cli import app
from fedforget.client.training import evaluate
from fedforget.ensemble import ShardEnsemble, split_ensemble_arrays
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.sharding import load_assignment
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.runner import simulate
from fedforget.simulations.sharded import shard_federation_id
from fedforget.simulations.task import test_dataset as held_out_test_set
from fedforget.simulations.verification import model_from_arrays

pytestmark = pytest.mark.simulation


def test_a_sharded_simulation_serves_and_measures_the_ensemble_and_unlearns_one_shard(tmp_path):
    config = SimulationConfig(
        dataset="digits", clients=4, rounds=3, shards=2, withdrawals=(Withdrawal("1", 3),), backdoors=("1",),
        shadows=0,
    )
    out = tmp_path / "run"
    result = simulate(config, out)
    report = json.loads((out / "report.json").read_text())
    assignment = load_assignment(out / "shards.json")
    own = assignment.shard_of("1")
    other = 1 - own
    assert [s["clients"] for s in report["shards"]] == [list(s) for s in assignment.shards]

    def store(index: int) -> HistoryStore:
        return HistoryStore.open(out / "shards" / f"shard-{index}" / "store", readonly=True)

    # The served model is the ensemble of the shards' final models: its accuracy is what the report says.
    with store(0) as first, store(1) as second:
        finals = [first.read_model(3), second.read_model(3)]
        assert [t.id for t in (second if other == 1 else first).trajectories()] == [1]  # the other shard: untouched
    ensemble = ShardEnsemble([model_from_arrays("digits", arrays) for arrays in finals])
    assert report["final_test_accuracy"] == evaluate(ensemble, held_out_test_set("digits")).accuracy

    # The withdrawal was unlearned in its shard alone, and named there.
    (event,) = report["unlearning"]
    assert (event["client"], event["shard"], event["strategy"]) == ("1", own, "retrain")
    certificate = json.loads(next((out / "shards" / f"shard-{own}" / "certificates").glob("*.json")).read_text())
    assert certificate["certificate"]["federation_id"] == shard_federation_id(config, own)
    assert not list((out / "shards" / f"shard-{other}" / "certificates").glob("*.json"))
    # ... in its ledger's unlearning entry, which the certificate quotes and attests in words ...
    scope = {"index": own, "count": 2, "clients": list(assignment.shards[own])}
    (quoted,) = [e for e in certificate["certificate"]["ledger_entries"] if e["kind"] == "unlearning"]
    assert quoted["body"]["shard"] == scope
    assert any(f"only in shard {own} " in s for s in certificate["certificate"]["attests"])
    # ... and the audit finds the client's shard from the run's directory.
    audit = CliRunner().invoke(app, ["audit", "client", "1", "--state", str(out), "--json"])
    assert audit.exit_code == 0, audit.output
    answer = json.loads(audit.output)
    assert answer["shard"] == scope and answer["ledger"].endswith(f"shard-{own}/state/ledger.jsonl")
    assert [e["shard"] for e in answer["removed_by"]] == [scope]
    lost = CliRunner().invoke(app, ["audit", "client", "nobody", "--state", str(out)])
    assert lost.exit_code == 2 and "is in no shard" in lost.output

    # The evidence is measured on ensembles that differ in the withdrawing client's shard only.
    published = {
        role: split_ensemble_arrays(load_arrays(out / "models" / f"{role}-client1-round3.npz"))
        for role in ("original", "unlearned", "retrain")
    }
    with store(own) as shard, store(other) as rest:
        (unlearning,) = [t for t in shard.trajectories() if t.status == "complete"]
        expected_own = {"original": shard.reader(1).model(2), "unlearned": shard.reader(unlearning.id).model(2)}
        rest_model = rest.read_model(2)
    for role, shards in published.items():
        assert shards is not None and len(shards) == 2
        assert all(np.array_equal(shards[other][k], rest_model[k]) for k in rest_model)
        own_expected = expected_own["original" if role == "original" else "unlearned"]
        assert all(np.array_equal(shards[own][k], own_expected[k]) for k in own_expected)
    (entry,) = result.verification["unlearning"]  # type: ignore[index]
    assert entry["shard"] == own
    assert entry["unlearned"]["backdoor_asr"] == entry["retrain"]["backdoor_asr"]  # exact: one and the same ensemble
    assert entry["distance_to_retrain"]["l2"] == 0.0 and entry["distance_to_retrain"]["original_l2"] > 0

    # A resume keeps the assignment and the finished shard, and finishes the other from its store.
    saved_assignment = (out / "shards.json").read_text()
    (out / "report.json").unlink()
    (out / "shards" / f"shard-{other}" / "report.json").unlink()
    resumed = simulate(config, out, resume=True).report
    assert (out / "shards.json").read_text() == saved_assignment
    assert resumed["final_test_accuracy"] == report["final_test_accuracy"]
    assert resumed["shards"] == report["shards"][:other] + [resumed["shards"][other]] + report["shards"][other + 1:]
    with store(other) as rest:
        assert rest.last_completed_round() == 3 and [t.id for t in rest.trajectories()] == [1]


def test_a_shard_whose_only_client_withdraws_leaves_the_served_ensemble(tmp_path):
    config = SimulationConfig(dataset="digits", clients=3, rounds=2, shards=2, withdrawals=(Withdrawal("1", 2),),
                              backdoors=("1",), shadows=0)
    out = tmp_path / "run"
    result = simulate(config, out)
    assignment = load_assignment(out / "shards.json")
    assert assignment.shards[1] == ("1",)  # alone in its shard
    report = json.loads((out / "report.json").read_text())
    assert [s["served"] for s in report["shards"]] == [True, False]
    (event,) = report["unlearning"]
    assert (event["client"], event["shard"], event["strategy"]) == ("1", 1, "empty-shard")
    # The served model is the other shard's alone, from the first round on.
    with HistoryStore.open(out / "shards" / "shard-0" / "store", readonly=True) as store:
        kept = model_from_arrays("digits", store.read_model(2))
    assert report["final_test_accuracy"] == evaluate(ShardEnsemble([kept]), held_out_test_set("digits")).accuracy
    # The evidence: without the shard, the unlearned ensemble is the retrained one.
    (entry,) = result.verification["unlearning"]  # type: ignore[index]
    assert entry["unlearned"]["backdoor_asr"] == entry["retrain"]["backdoor_asr"]
    assert entry["distance_to_retrain"]["l2"] == 0.0
    certificate = json.loads(next((out / "shards" / "shard-1" / "certificates").glob("*.json")).read_text())
    assert any("No client of shard 1 remains" in s for s in certificate["certificate"]["attests"])
