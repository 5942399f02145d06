"""End to end on Flower's simulation engine (Ray): the real `fedforget simulate` path.

These are the slow tests (Ray starts in ~10 s); they cover what the in-process
grid cannot: ClientApps shipped to worker processes, the command line, the
report, and a run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedforget.client.certificate_check import verify_certificate
from fedforget.server.rounds.loop import SilentObserver
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.runner import simulate

pytestmark = pytest.mark.simulation

RAY_DASHBOARD_PORT = 8265


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in found]
        found.update(children)
        frontier.extend(children)
    return found


def _listening_sockets(pids: set[int]) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if columns[3] != "0A" or columns[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = columns[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(ordered)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            listening.add((ip, int(port, 16)))
    return listening


class _SocketsDuringFirstRound(SilentObserver):
    """Notes what this process and its children (Ray's) listen on while round 1 is done and Ray is up."""

    def __init__(self) -> None:
        self.sockets: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
        self.unlearning_steps: list[str] = []

    def unlearning_step(self, step: str) -> None:
        self.unlearning_steps.append(step)

    def round_finished(self, entry: dict[str, object]) -> None:
        if entry["round"] == 1:
            self.sockets = _listening_sockets(_descendants(os.getpid()))


def test_simulation_with_withdrawal_writes_store_and_report_on_a_loopback_only_ray(tmp_path):
    config = SimulationConfig(
        dataset="digits", clients=4, rounds=3, withdrawals=(Withdrawal("1", 3),), backdoors=("1",), shadows=2
    )
    listening = _SocketsDuringFirstRound()
    report = simulate(config, tmp_path / "run", observer=listening).report

    # Ray (and the simulation's withdrawal service) listened on loopback only, with no dashboard.
    assert listening.sockets, "nothing listened during the run: this check would prove nothing"
    assert all(ip.is_loopback for ip, _ in listening.sockets), sorted(map(str, listening.sockets))
    assert RAY_DASHBOARD_PORT not in {port for _, port in listening.sockets}

    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3]
    for entry in on_disk["rounds"]:
        assert 0.0 <= entry["test_accuracy"] <= 1.0 and entry["test_loss"] > 0
    assert on_disk["rounds"][2]["participants"] == ["0", "2", "3"]
    assert on_disk["store"]["bytes"] > 0
    # The current (unlearned) trajectory: rounds 1-2 replayed and round 3, three clients each ...
    assert on_disk["store"]["client_rounds"] == 9
    # ... while the original rounds 1-2 (four clients) stay on disk until the key is destroyed.
    assert on_disk["store"]["update_blobs"] == 4 + 4 + 9
    (unlearning,) = on_disk["unlearning"]
    assert unlearning["client"] == "1" and unlearning["round"] == 3 and unlearning["strategy"] == "retrain"
    assert unlearning["client_epochs"] == pytest.approx(2 * 3 * config.local_epochs)  # 2 rounds replayed, 3 clients
    assert unlearning["seconds"] > 0
    # Each replayed round was reported as it ended, not only the unlearning's end.
    assert [step.split(",")[0] for step in listening.unlearning_steps] == [
        "round trip 1: round 1 trained", "round trip 2: round 2 trained",
    ]
    for key in ("test_accuracy_before", "test_accuracy_after"):
        assert 0.0 < unlearning[key] <= 1.0
    assert on_disk["wall_seconds"] > 0
    # The simulated client withdrew through the real service and got a certificate that verifies.
    (certificate,) = on_disk["certificates"]
    assert certificate["client"] == "1"
    assert verify_certificate(certificate["path"], certificate["server_key"]).valid
    verification = json.loads((tmp_path / "run" / "verification.json").read_text())
    assert [u["client"] for u in verification["unlearning"]] == ["1"]
    assert (tmp_path / "run" / "plots" / "backdoor_asr.png").exists()

    with HistoryStore.open(tmp_path / "run" / "store") as store:
        reader = store.reader()
        assert "1" not in reader.clients()
        for view in reader.rounds():
            step = {k: v - view.model_before()[k] for k, v in view.model_after().items()}
            total = {k: np.zeros_like(v) for k, v in step.items()}
            for info, update in view.updates():
                for k in total:
                    total[k] += info.weight * update[k]
            for k in step:
                np.testing.assert_allclose(total[k], step[k], atol=1e-6)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _rounds_in_ledger(ledger: Path) -> set[int]:
    """Rounds the ledger records: the loop writes a round's entry only after the store has committed it."""
    rounds = set()
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry.get("kind") == "round":
            rounds.add(int(entry["body"]["round"]))
    return rounds


def test_killed_run_resumes_from_last_completed_round(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--clients", "3", "--rounds", "5", "--withdraw", "0@4", "--shadows", "0", "--out", str(out)]
    command = [sys.executable, "-m", "fedforget.cli", "simulate", *args]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Printing "round 2/5" comes before the background writer commits round 2; the ledger comes after.
        _wait_for(lambda: 2 in _rounds_in_ledger(out / "state" / "ledger.jsonl"), 300, "round 2 to be committed")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and every Ray process it started
        first.wait(timeout=30)
    _wait_for(lambda: not _alive(first.pid), 30, "the killed run to disappear")
    assert not (out / "report.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "fedforget.cli", "simulate", "--resume", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at round" in resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    assert report["resumed_from_round"] >= 2
    assert [u["client"] for u in report["unlearning"]] == ["0"]
    with HistoryStore.open(out / "store") as store:
        assert store.last_completed_round() == 5
        assert [v.round for v in store.reader().rounds()] == [1, 2, 3, 4, 5]
