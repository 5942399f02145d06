"""The README's deployment walkthrough, pasted block by block into one bash shell.

The blocks marked ``<!-- deployment: NAME -->`` are run unchanged, in order,
except that ``FED`` points into the test's temporary directory and free
loopback ports replace the README's fixed ones, so that two copies of the
suite on one machine do not collide. The test only
waits where a person would (for a round before withdrawing) and checks
what the walkthrough promises: a TLS federation of three organisations, a
withdrawal that ends with a valid certificate, a ledger that matches the
store, and no process left behind.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from fedforget.simulations.local_federation import SOURCE_TREE, free_port, wait_until
from fedforget.simulations.processes import ProcessGroup

pytestmark = pytest.mark.e2e

README = SOURCE_TREE / "README.md"
FED_LINE = "export FED=$PWD/runs/federation"
README_PORTS = ("9093", "9094")  # the SuperLink, the withdrawal service
SUPERNODE_BASE_PORT = "9201"  # the SuperNodes listen on $((9201 + i)), i = 0, 1, 2


def _free_consecutive_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are free now."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free loopback ports found")


def with_free_ports(block: str, ports: dict[str, str]) -> str:
    for readme_port, port in ports.items():
        block = re.sub(rf"\b{readme_port}\b", port, block)
    return block


def deployment_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    blocks = re.findall(r"<!-- deployment: ([\w-]+) -->\n```bash\n(.*?)```", text, re.DOTALL)
    assert [name for name, _ in blocks] == [
        "setup", "credentials", "superlink", "register", "withdrawal-service", "supernodes", "run",
        "withdraw", "follow", "finish",
    ], "the README's deployment walkthrough changed: update this test with it"
    return blocks


class Shell:
    """One bash process fed the README's blocks; each block's end is marked in the shared log."""

    def __init__(self, processes: ProcessGroup) -> None:
        self.processes = processes
        self.bash = processes.start("walkthrough", ["bash", "--noprofile", "--norc"], cwd=SOURCE_TREE, stdin=True)
        self.steps = 0

    def run(self, name: str, block: str, timeout: float) -> str:
        self.steps += 1
        marker = f"__step_{self.steps}_{name}_exit="
        assert self.bash.stdin is not None
        self.bash.stdin.write(f"{block}\necho {marker}$?\n".encode())
        self.bash.stdin.flush()
        found = wait_until(
            lambda: re.search(re.escape(marker) + r"(\d+)", self.processes.log("walkthrough")), timeout,
            f"the README block {name!r} to finish",
        )
        status = int(found.group(1))  # type: ignore[union-attr]
        assert status == 0, f"README block {name!r} failed ({status}):\n{self.processes.log('walkthrough')[-4000:]}"
        return self.processes.log("walkthrough")


@pytest.mark.timeout(420)
def test_the_readme_deployment_walkthrough_works_when_pasted(tmp_path: Path) -> None:
    fed = tmp_path / "federation"
    processes = ProcessGroup(tmp_path / "logs", env={k: v for k, v in __import__("os").environ.items()})
    try:
        shell = Shell(processes)
        ports = {port: str(free_port()) for port in README_PORTS}
        ports[SUPERNODE_BASE_PORT] = str(_free_consecutive_ports(3))
        assert len(set(ports.values())) == len(ports)
        for name, block in deployment_blocks():
            block = with_free_ports(block, ports)
            if name == "setup":
                assert FED_LINE in block
                block = block.replace(FED_LINE, f"export FED={fed}")
            if name == "withdraw":
                # A person waits for a round or two before withdrawing.
                wait_until(lambda: _ledger_rounds(fed) >= 1, 180, "a round in the ledger")
            shell.run(name, block, timeout=300 if name in ("follow", "finish") else 120)
        log = processes.log("walkthrough")
        assert "VALID" in log and "INVALID" not in log
        report = json.loads((fed / "server-state" / "report.json").read_text())
        assert [u["clients"] for u in report["unlearning"]] == [["org-c"]]
        assert report["rounds"][-1]["participants"] == ["org-a", "org-b"]
        assert (fed / "superlink.log").read_text().count("Uvicorn running on https://") == 1
    finally:
        if processes.started["walkthrough"].stdin:
            processes.started["walkthrough"].stdin.close()
        left = processes.stop_all()
    assert not left, f"processes left behind: {left}"


def _ledger_rounds(fed: Path) -> int:
    path = fed / "server-state" / "state" / "ledger.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind":"round"' in line)
