"""``fedforget unlearn --store``: an operator erases a client from a store the Python API recorded.

No withdrawal service, no request, no enrolment: the operator names the
client and the reason. The erasure is recorded as operator-initiated in the
ledger and the certificate, prints no false warning, and a failed attempt
leaves every file as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import plain_client
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from local_grid import LocalGrid
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.client.certificate_check import verify_certificate
from fedforget.identity import generate_keypair
from fedforget.server import HistoryStore, ModelSpec, RecordingFedAvg, Unlearning
from fedforget.server.ledger.log import Ledger
from fedforget.server.store.errors import KeyDestroyedError

LR = ConfigRecord({"lr": 0.5})


@pytest.fixture
def api_store(tmp_path):
    """Rounds and one unlearning recorded by a user's own ServerApp, with no signing key: no ledger."""
    grid = LocalGrid(plain_client.app, 3)
    model = plain_client.Net()
    store_dir = tmp_path / "fedforget" / "store"
    spec = ModelSpec.from_arrays(model.state_dict())
    with HistoryStore.create(store_dir, federation_id="my-federation", model_spec=spec) as store:
        strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_available_nodes=1)
        unlearning = Unlearning(strategy)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), train_config=LR, num_rounds=3)
        report = unlearning.unlearn(grid, "2", "retrain")
        strategy.start(grid=grid, initial_arrays=report.arrays, train_config=LR, num_rounds=1)
    generate_keypair(tmp_path / "federation.key", tmp_path / "federation.pub")
    return store_dir


def _erase(store_dir: Path, *extra: str, client: str = "1", strategy: str = "fedrecovery") -> object:
    return CliRunner().invoke(
        app, ["unlearn", "--store", str(store_dir), "--client", client, "--strategy", strategy, *extra]
    )


def test_an_operator_erases_a_client_from_a_store_the_api_recorded(api_store, tmp_path, caplog):
    key = tmp_path / "federation.key"
    with caplog.at_level(logging.INFO):
        result = _erase(api_store, "--reason", "court order 17/2025", "--signing-key", str(key))
    assert result.exit_code == 0, result.output
    assert "operator-initiated" in result.output
    # No false warning: the API's own trajectories are not taken for an interrupted unlearning,
    # and rounds recorded before there was a ledger are not taken for ledger entries lost in a crash.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "entered in the ledger from the history store" in caplog.text
    state = api_store.parent
    assert not (state / "state" / "consent.sqlite").exists()

    with HistoryStore.open(api_store) as store:
        statuses = {t.id: t.status for t in store.trajectories()}
        assert "abandoned" not in statuses.values() and list(statuses.values()).count("complete") == 2
        (last,) = list(store.reader().rounds(4, 4))
        assert last.participants == []  # fedrecovery records its result as a round of its own
        with pytest.raises(KeyDestroyedError):
            next(store.reader(1).rounds()).update("1")
    with Ledger.open(state / "state" / "ledger.jsonl") as ledger:
        ledger.verify()
        (entry,) = [e for e in ledger.entries() if e.kind == "unlearning"]
    assert entry.body["initiated_by"] == {"1": "operator"}
    assert entry.body["reasons"] == {"1": "court order 17/2025"}

    (certificate_path,) = (state / "certificates").iterdir()
    certificate = json.loads(certificate_path.read_text())["certificate"]
    assert certificate["request"] == {"client_id": "1", "initiated_by": "operator", "reason": "court order 17/2025"}
    report = verify_certificate(certificate_path, tmp_path / "federation.pub")
    assert report.valid, report.reason
    assert any("operator initiated this erasure" in line for line in report.attests)
    assert any("signed no request" in line for line in report.does_not_attest)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes (the store's lock file holds the last pid)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "store.lock"
    }


def test_a_failed_erasure_leaves_every_file_as_it_was(api_store, tmp_path):
    key = str(tmp_path / "federation.key")
    before = _tree(tmp_path)
    attempts = {
        "an unknown client": (_erase(api_store, "--reason", "r", "--signing-key", key, client="client-1"),
                              "have no update"),
        "a client unlearned already": (_erase(api_store, "--reason", "r", client="2"), "unlearned from"),
        "a strategy that needs clients": (_erase(api_store, "--reason", "r", strategy="retrain"),
                                          "needs work from the remaining clients"),
        "no reason": (_erase(api_store), "--reason"),
        "a missing key": (_erase(api_store, "--reason", "r", "--signing-key", str(tmp_path / "none.key")),
                          "does not exist"),
        "no registry for a request": (
            CliRunner().invoke(app, ["unlearn", "--state", str(api_store.parent), "--client", "1",
                                     "--signing-key", key]),
            "no consent registry",
        ),
    }
    for what, (result, message) in attempts.items():
        assert result.exit_code == 2, (what, result.output)  # type: ignore[attr-defined]
        assert message in " ".join(result.output.split()), (what, result.output)  # type: ignore[attr-defined]
    assert _tree(tmp_path) == before


def test_a_store_that_keeps_a_ledger_is_not_erased_from_without_its_key(api_store, tmp_path):
    key = str(tmp_path / "federation.key")
    assert _erase(api_store, "--reason", "first", "--signing-key", key).exit_code == 0
    before = _tree(tmp_path)
    refused = _erase(api_store, "--reason", "second", client="0")
    assert refused.exit_code == 2 and "pass --signing-key" in " ".join(refused.output.split())
    assert _tree(tmp_path) == before


def test_without_a_signing_key_the_erasure_shreds_but_certifies_nothing(api_store):
    result = _erase(api_store, "--reason", "contract ended")
    assert result.exit_code == 0, result.output
    assert "no ledger entry and no certificate" in " ".join(result.output.split())
    with HistoryStore.open(api_store) as store:
        with pytest.raises(KeyDestroyedError):
            next(store.reader(1).rounds()).update("1")
        (event,) = [t.info for t in store.trajectories() if t.info.get("clients") == ["1"]]
    assert event["initiated_by"] == {"1": "operator"} and event["reasons"] == {"1": "contract ended"}
    assert not (api_store.parent / "state").exists()


def test_side_trajectories_a_benchmark_left_open_are_not_taken_for_an_interrupted_unlearning(tmp_path, caplog):
    """The store the issue's user had: unlearnings run with run_unlearner, their trajectories left open."""
    from flower_fixtures import initial_model, local_federation

    from fedforget.strategies.registry import make_unlearner

    fed = local_federation(tmp_path / "run" / "store", clients=3, rounds=2)
    fed.run.execute(initial_model())
    source = fed.store.current_trajectory()
    fed.strategy.exclude(["2"])
    for name in ("subtract", "retrain"):
        fed.run.run_unlearner(make_unlearner(name), ["2"], 2, source)
    fed.store.switch_trajectory(source)
    fed.store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = _erase(tmp_path / "run" / "store", "--reason", "asked by the regulator", client="0")
    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with HistoryStore.open(tmp_path / "run" / "store") as store:
        statuses = [t.status for t in sorted(store.trajectories(), key=lambda t: t.id)]
    assert statuses == ["open", "open", "open", "complete"]  # the side trajectories are as they were
