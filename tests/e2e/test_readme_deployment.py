"""The README's deployment walkthrough, pasted block by block into one bash shell.

The blocks marked ``<!-- deployment: NAME -->`` are run unchanged, in order,
except that ``FED`` points into the test's temporary directory. The test only
waits where a person would (for two rounds before withdrawing) and checks
what the walkthrough promises: a TLS federation of three organisations, a
withdrawal that ends with a valid certificate, a ledger that matches the
store, and no process left behind.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from fedforget.simulations.local_federation import SOURCE_TREE, wait_until
from fedforget.simulations.processes import ProcessGroup

pytestmark = pytest.mark.e2e

README = SOURCE_TREE / "README.md"
FED_LINE = "export FED=$PWD/runs/federation"


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
        for name, block in deployment_blocks():
            if name == "setup":
                assert FED_LINE in block
                block = block.replace(FED_LINE, f"export FED={fed}")
            if name == "withdraw":
                # A person waits for a round or two before withdrawing.
                wait_until(lambda: _ledger_rounds(fed) >= 2, 180, "two rounds in the ledger")
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
