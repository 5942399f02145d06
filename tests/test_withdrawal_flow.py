"""The whole withdrawal path in one process: signed request -> service -> registry -> unlearning -> proof.

A real withdrawal service on loopback TLS, the client's own signed request,
the round loop reading the consent registry between rounds, crypto-shredding,
the ledger and a certificate checked offline (no simulation engine: the
federation runs on the in-process grid).
"""

from __future__ import annotations

import json

import pytest
from flower_fixtures import initial_model, local_federation

from fedforget.client.certificate_check import verify_certificate
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.withdrawal.consent import RegistryConsent, Withdrawal
from fedforget.server.withdrawal.registry import ConsentRegistry
from fedforget.server.store.errors import KeyDestroyedError
from fedforget.server.rounds.loop import SilentObserver
from fedforget.identity import load_public_key
from fedforget.server.ledger.audit import audit as audit_ledger
from fedforget.server.ledger.log import Ledger
from fedforget.server.ledger.queries import client_history
from fedforget.server.withdrawal.service import serve
from fedforget.simulations.withdrawing_clients import FederationPaths, WithdrawingClients, prepare_federation

FEDERATION = "test-federation"


def _accountability(paths: FederationPaths, **options: object) -> Accountability:
    return Accountability(
        ledger_path=paths.ledger, server_key=paths.server_key, certificates_dir=paths.certificates,
        federation_id=FEDERATION, **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def withdrawn_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    paths = FederationPaths(root)
    prepare_federation(paths, ["1"])
    tls = paths.tls()
    service = serve("127.0.0.1:0", registry_path=paths.registry, federation_id=FEDERATION,
                    cert=tls.certificate, key=tls.private_key)
    try:
        clients = WithdrawingClients(SilentObserver(), [Withdrawal("1", 3)], paths, service.address, FEDERATION)
        fed = local_federation(
            root / "store", clients=3, rounds=4, consent=RegistryConsent(paths.registry),
            accountability=_accountability(paths), observer=clients,
        )
        outcome = fed.run.execute(initial_model())
    finally:
        service.stop()
    return paths, fed, outcome, clients


def test_the_request_is_done_with_a_certificate(withdrawn_run):
    paths, _, outcome, clients = withdrawn_run
    request_id = clients.request_ids["1"]
    with ConsentRegistry.open(paths.registry) as registry:
        request = registry.status(request_id)
    assert request.status == "done"
    (event,) = outcome.unlearning
    assert request.certificate == event["certificates"]["1"]
    report = verify_certificate(request.certificate, paths.server_public_key)
    assert report.valid, report.reason
    assert any("destroyed" in line for line in report.attests)
    assert any("no trace" in line for line in report.does_not_attest)


def test_a_tampered_certificate_fails(withdrawn_run, tmp_path):
    paths, _, outcome, _ = withdrawn_run
    original = outcome.unlearning[0]["certificates"]["1"]
    text = open(original).read()
    forged = tmp_path / "forged.json"
    forged.write_text(text.replace('"retrain"', '"retrair"', 1))
    assert text != forged.read_text()
    assert not verify_certificate(forged, paths.server_public_key).valid


def test_the_withdrawn_client_is_shredded_and_the_others_still_decrypt(withdrawn_run):
    _, fed, outcome, _ = withdrawn_run
    source = outcome.unlearning[0]["source_trajectory"]
    view = next(fed.store.reader(source).rounds())
    with pytest.raises(KeyDestroyedError, match="'1'"):
        view.update("1")
    assert view.update("0") is not None and view.update("2") is not None


def test_the_ledger_is_intact_and_says_which_models_contain_the_client(withdrawn_run):
    paths, fed, outcome, _ = withdrawn_run
    with Ledger.open(paths.ledger) as ledger:
        kinds = [e.kind for e in ledger.entries()]
        assert ledger.verify() == len(kinds)
        audit = client_history(ledger, "1")
    assert kinds.count("withdrawal-request") == 1 and kinds.count("unlearning") == 1
    with Ledger.open(paths.ledger) as ledger:
        (unlearning,) = [e for e in ledger.entries() if e.kind == "unlearning"]
    assert unlearning.body["initiated_by"] == {"1": "client"} and "reasons" not in unlearning.body
    assert kinds.count("key-destroyed") == 1
    event = outcome.unlearning[0]
    assert audit.contains(event["source_trajectory"], 2) is True
    for version in range(1, 5):
        assert audit.contains(event["trajectory"], version) is False
    fed.store.close()
    report = audit_ledger(paths.ledger, load_public_key(paths.server_public_key), store=fed.store.path)
    assert report.ok, report.findings.items


def test_every_round_of_the_run_is_in_the_ledger(withdrawn_run):
    paths, _, outcome, _ = withdrawn_run
    with Ledger.open(paths.ledger) as ledger:
        rounds = [(e.body["trajectory"], e.body["round"]) for e in ledger.entries() if e.kind == "round"]
    trajectory = outcome.unlearning[0]["trajectory"]
    # original rounds 1-2, replayed rounds 1-2 and rounds 3-4 in the unlearned trajectory
    assert rounds == [(1, 1), (1, 2), (trajectory, 1), (trajectory, 2), (trajectory, 3), (trajectory, 4)]
    json.dumps(outcome.unlearning)  # the event stays serialisable


@pytest.mark.parametrize("strategy", ["subtract", "fedrecovery", "replay", "calibrated", "retrain"])
def test_a_later_unlearning_never_reads_an_earlier_shredded_client(tmp_path, strategy):
    """After client 1's key is destroyed its updates are unreadable; unlearning client 2 later must not need them."""
    from fedforget.strategies.registry import make_unlearner

    paths = FederationPaths(tmp_path)
    prepare_federation(paths, [])
    fed = local_federation(
        tmp_path / "store", clients=4, rounds=6,
        withdrawals=[Withdrawal("1", 3), Withdrawal("2", 5)], unlearner=make_unlearner(strategy),
        accountability=_accountability(paths),
    )
    outcome = fed.run.execute(initial_model())
    assert [e["clients"] for e in outcome.unlearning] == [["1"], ["2"]]
    assert all(len(e["certificates"]) == 1 for e in outcome.unlearning)
    with Ledger.open(paths.ledger) as ledger:
        assert ledger.verify() > 0


def test_a_request_made_between_runs_is_unlearned_now_by_fedforget_unlearn(tmp_path):
    from typer.testing import CliRunner

    from fedforget.cli import app
    from fedforget.client.withdraw import submit_withdrawal

    paths = FederationPaths(tmp_path)
    prepare_federation(paths, ["1"])
    fed = local_federation(tmp_path / "store", clients=3, rounds=3, accountability=_accountability(paths))
    fed.run.execute(initial_model())
    fed.store.close()  # the run is over

    tls = paths.tls()
    service = serve("127.0.0.1:0", registry_path=paths.registry, federation_id="test-federation",
                    cert=tls.certificate, key=tls.private_key)
    try:
        request_id = submit_withdrawal(service.address, tls.ca_certificate, paths.client_key("1"), "1",
                                       "test-federation", reason="left the consortium")
    finally:
        service.stop()

    for needs_clients in ("retrain", "subtract"):  # subtract's recovery rounds need the remaining clients
        refused = CliRunner().invoke(
            app, ["unlearn", "--state", str(tmp_path), "--client", "1", "--strategy", needs_clients]
        )
        said = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "needs work from the remaining clients" in said
        assert "use --strategy fedrecovery" in said  # a remedy that works

    result = CliRunner().invoke(app, ["unlearn", "--state", str(tmp_path), "--client", "1"])  # fedrecovery
    assert result.exit_code == 0, result.output
    assert "by fedrecovery in" in " ".join(result.output.split())
    with ConsentRegistry.open(paths.registry) as registry:
        request = registry.status(request_id)
    assert request.status == "done"
    assert verify_certificate(request.certificate, paths.server_public_key).valid
    from fedforget.server.store.history_store import HistoryStore

    with HistoryStore.open(tmp_path / "store") as store:
        view = next(store.reader(1).rounds())
        with pytest.raises(KeyDestroyedError):
            view.update("1")
        assert store.last_completed_round() == 3  # the unlearned model is version 3 of a new trajectory
        assert store.current_trajectory() != 1
    with Ledger.open(paths.ledger) as ledger:
        kinds = [e.kind for e in ledger.entries()]
    # subtract continues from versions 1-2 of the old history (kept, said so); its version 3 is shredded
    assert kinds[-5:] == ["withdrawal-request", "unlearning", "key-destroyed", "models-retained", "models-shredded"]


def test_a_second_request_of_an_unlearned_client_is_answered_not_acted_on(tmp_path):
    """Client 1 withdraws before round 2 and again before round 4: one unlearning, one key destruction."""
    from fedforget.client.withdraw import submit_withdrawal

    paths = FederationPaths(tmp_path)
    prepare_federation(paths, ["1"])
    tls = paths.tls()
    service = serve("127.0.0.1:0", registry_path=paths.registry, federation_id=FEDERATION,
                    cert=tls.certificate, key=tls.private_key)
    submitted: list[str] = []

    class Withdrawer(SilentObserver):
        def round_starting(self, server_round: int) -> None:
            if server_round in (2, 4):
                submitted.append(submit_withdrawal(service.address, tls.ca_certificate, paths.client_key("1"), "1", FEDERATION))

    try:
        fed = local_federation(
            tmp_path / "store", clients=3, rounds=4, consent=RegistryConsent(paths.registry),
            accountability=_accountability(paths), observer=Withdrawer(),
        )
        outcome = fed.run.execute(initial_model())
    finally:
        service.stop()
    assert len(outcome.unlearning) == 1
    with ConsentRegistry.open(paths.registry) as registry:
        first, second = (registry.status(r) for r in submitted)
    assert first.status == "done"
    assert second.status == "already-withdrawn" and second.certificate == first.certificate
    with Ledger.open(paths.ledger) as ledger:
        kinds = [e.kind for e in ledger.entries()]
        audit = client_history(ledger, "1")
    assert kinds.count("unlearning") == 1 and kinds.count("key-destroyed") == 1
    assert len(audit.keys_destroyed) == 1  # `fedforget audit client` lists the destruction once


def test_an_audit_retention_period_keeps_old_models_until_it_ends_then_shreds_them(tmp_path):
    """With a retention period the certificate and the ledger say what is kept until when; then it is shredded."""
    import datetime as dt

    from fedforget.server.store.history_store import HistoryStore

    paths = FederationPaths(tmp_path)
    prepare_federation(paths, [])
    fed = local_federation(
        tmp_path / "store", clients=3, rounds=4, withdrawals=[Withdrawal("1", 3)],
        accountability=_accountability(paths, old_models_retention=dt.timedelta(0)),  # ends at once: shredded at the next round
    )
    outcome = fed.run.execute(initial_model())
    certificate = json.loads(open(outcome.unlearning[0]["certificates"]["1"]).read())["certificate"]
    retained = certificate["old_models"]["retained"]
    assert retained and certificate["old_models"]["shredded"] == []
    assert {(m["trajectory"], m["version"]) for m in retained} == {(1, 1), (1, 2)}  # client 1 trained in rounds 1-2
    assert any(certificate["old_models"]["retain_until"] in s for s in certificate["attests"])
    with Ledger.open(paths.ledger) as ledger:
        entries = list(ledger.entries())
    kept = next(e for e in entries if e.kind == "models-retained")
    shredded = next(e for e in entries if e.kind == "models-shredded")
    assert kept.index < shredded.index and shredded.body["models"] == kept.body["models"]
    assert shredded.body["reason"] == "the audit retention period ended"
    fed.store.close()
    with HistoryStore.open(tmp_path / "store") as store:
        with pytest.raises(KeyDestroyedError, match="global model"):
            store.reader(1).model(2)
    report = audit_ledger(paths.ledger, load_public_key(paths.server_public_key), store=tmp_path / "store")
    assert report.ok, report.findings.items
