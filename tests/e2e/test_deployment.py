"""A TLS federation of three organisations as real processes on loopback, with a withdrawal and a crash.

SuperLink (TLS, SuperNode authentication, database) + three SuperNodes, each
with its own key and data file + the withdrawal service, all started by the
commands of the README's deployment section. One organisation withdraws with
``fedforget withdraw`` while the run trains; the server unlearns it and the
other two carry on. A second organisation withdraws and the server side
(SuperLink, SuperExec, ServerApp) is killed with SIGKILL right after the
acknowledgement; the restarted SuperLink and ``flwr run ... resume=true``
continue from the last completed round, act on the acknowledged request, and
nothing is lost. Every process is ended by pid at the end, and none is left.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedforget.simulations.local_federation import (
    BIN,
    CONNECTION,
    LoopbackFederation,
    free_port,
    running_federation,
    wait_until,
)

pytestmark = pytest.mark.e2e

ORGANISATIONS = ["org-a", "org-b", "org-c"]
ROUNDS = 5


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackFederation]:
    with running_federation(tmp_path_factory.mktemp("federation"), ORGANISATIONS) as fed:
        yield fed


def test_a_supernode_with_an_unregistered_key_is_refused(federation: LoopbackFederation) -> None:
    federation.command("fedforget", "keys", "generate", "intruder", "--dir", str(federation.root / "intruder"))
    intruder = federation.start_supernode("org-a", name="intruder", key=federation.root / "intruder" / "intruder.key")
    assert intruder.wait(timeout=60) != 0
    log = federation.processes.log("intruder")
    assert "2004" in log and "Failed to activate SuperNode" in log, log[-2000:]
    assert federation.online_nodes() == set(federation.node_ids.values())


def test_plaintext_clients_are_refused(federation: LoopbackFederation) -> None:
    request = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    for port in (federation.superlink_port, federation.service_port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(request)
            try:
                answer = plain.recv(64)
            except ConnectionResetError:
                answer = b""
        assert not answer.startswith(b"HTTP/"), f"port {port} answered plaintext HTTP: {answer!r}"
    # A SuperNode without TLS never gets in; it keeps retrying until stopped.
    plaintext = federation.processes.start(
        "plaintext-supernode",
        [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{federation.superlink_port}",
            "--insecure",
            "--node-config", f"data-file='{federation.data_file('org-a')}'",
            "--port", str(free_port()),
        ],
    )
    wait_until(
        lambda: "Connection attempt failed" in federation.processes.log("plaintext-supernode"),
        60,
        "the plaintext SuperNode's connection to fail",
    )
    assert plaintext.poll() is None or plaintext.returncode != 0
    assert federation.online_nodes() == set(federation.node_ids.values())
    federation.processes.kill("plaintext-supernode")


@pytest.mark.timeout(420)
def test_withdrawal_unlearning_and_recovery_from_sigkill(federation: LoopbackFederation) -> None:
    started = time.monotonic()
    fed = federation
    run = fed.start_run("run", **{"num-rounds": ROUNDS, "min-nodes": 3})

    # org-c withdraws while the federation trains; the server unlearns it between rounds.
    wait_until(lambda: len(fed.ledger_rounds()) >= 1, 120, "a round in the ledger")
    first_request = fed.withdraw("org-c")
    unlearning = wait_until(lambda: _entries(fed, "unlearning"), 180, "the unlearning of org-c")
    before_round = int(unlearning[0]["body"]["round"])
    trajectory = int(unlearning[0]["body"]["trajectory"])
    wait_until(lambda: (trajectory, before_round) in fed.ledger_rounds(), 120, "a round after the unlearning")
    after = _round_entry(fed, trajectory, before_round)
    assert sorted(p["client"] for p in after["body"]["participants"]) == ["org-a", "org-b"]

    # org-b withdraws, and the server side dies the moment the request is acknowledged.
    second_request = fed.withdraw("org-b")
    killed = fed.processes.kill("superlink", signal.SIGKILL)
    assert len(killed) >= 3, f"expected SuperLink, SuperExec and ServerApp; killed {killed}"
    assert run.wait(timeout=60) != 0
    committed = _completed_rounds(fed, trajectory)
    ledger_before = fed.ledger()

    fed.start_superlink()
    wait_until(lambda: fed.online_nodes() == set(fed.node_ids.values()), 90, "the SuperNodes to reconnect")
    # The SuperLink's database still lists the killed run as running: stop it, as the README says.
    stale = [run_id for run_id, status in fed.runs().items() if status == "running"]
    assert len(stale) == 1, fed.runs()
    fed.command("flwr", "stop", str(stale[0]), CONNECTION)
    resumed = fed.start_run("run-resumed", **{"num-rounds": ROUNDS, "min-nodes": 3, "resume": True})
    assert resumed.wait(timeout=300) == 0, fed.processes.log("run-resumed")[-3000:]

    report = json.loads((fed.state / "report.json").read_text())
    # Nothing lost: the resumed run starts after the last round the store had committed ...
    assert report["resumed_from_round"] == committed
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    # ... every ledger entry written before the crash is still there, unchanged ...
    assert fed.ledger()[: len(ledger_before)] == ledger_before
    # ... each version of each trajectory is recorded once ...
    assert all(n == 1 for n in Counter(fed.ledger_rounds()).values()), fed.ledger_rounds()
    # ... and the acknowledged request was acted on after the restart.
    requests = {e["body"]["request_id"]: e for e in _entries(fed, "withdrawal-request")}
    assert set(requests) == {first_request, second_request}
    assert [e["clients"] for e in report["unlearning"]] == [["org-c"], ["org-b"]]
    final = report["rounds"][-1]
    assert final["participants"] == ["org-a"]
    fed.command("fedforget", "audit", "verify", "--ledger", str(fed.state / "state" / "ledger.jsonl"),
                "--server-key", str(fed.creds / "federation.pub"), "--store", str(fed.state / "store"))

    for organisation, request_id in (("org-c", first_request), ("org-b", second_request)):
        certificate = fed.state / "certificates" / f"{request_id}.json"
        checked = fed.command(
            "fedforget", "client", "verify-certificate", str(certificate), "--server-key",
            str(fed.creds / "federation.pub"),
        )
        assert "VALID" in checked.stdout and "INVALID" not in checked.stdout
        audit = json.loads(
            fed.command("fedforget", "audit", "client", organisation, "--ledger",
                        str(fed.state / "state" / "ledger.jsonl"), "--json").stdout
        )
        removed_at = _removal_trajectory(fed, organisation)
        later = [v for v in audit["contained"] if v[0] >= removed_at]
        assert not later, f"{organisation} is still in versions {later} after its unlearning"
        status = fed.command(
            "fedforget", "withdraw", "status", request_id, "--server", f"127.0.0.1:{fed.service_port}",
            "--ca", str(fed.creds / "ca.crt"), "--json",
        )
        assert json.loads(status.stdout)[0]["status"] == "done"
    assert time.monotonic() - started < 360


def _entries(fed: LoopbackFederation, kind: str) -> list[dict]:
    return [e for e in fed.ledger() if e.get("kind") == kind]


def _round_entry(fed: LoopbackFederation, trajectory: int, round_: int) -> dict:
    return next(
        e for e in _entries(fed, "round")
        if e["body"]["trajectory"] == trajectory and e["body"]["round"] == round_
    )


def _completed_rounds(fed: LoopbackFederation, trajectory: int) -> int:
    """The last round the store committed in ``trajectory``, read from the store itself."""
    from fedforget.server.store.history_store import HistoryStore

    with HistoryStore.open(Path(fed.state / "store")) as store:
        return store.reader(trajectory).last_round()


def _removal_trajectory(fed: LoopbackFederation, client: str) -> int:
    return next(int(e["body"]["trajectory"]) for e in _entries(fed, "unlearning") if client in e["body"]["clients"])
