"""The README's "Add fedforget to your Flower app" walkthrough, written out and run as a user would.

The files marked ``<!-- dropin: file PATH -->`` are written unchanged into an
empty directory (with the empty ``myapp/__init__.py`` the text asks for), and
the blocks marked ``<!-- dropin: NAME -->`` are pasted in order into one bash
shell there, except that a free port replaces 9092. The test checks what the
walkthrough promises: the ClientApp never mentions fedforget, the ServerApp
adds at most ten lines, the run records and unlearns organisation 1 and
trains on, the operator's later erasure is certified as operator-initiated,
and no process is left behind.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from fedforget.client.certificate_check import verify_certificate
from fedforget.server.ledger.log import Ledger
from fedforget.server.store.history_store import HistoryStore
from fedforget.simulations.local_federation import BIN, SOURCE_TREE, free_port, wait_until
from fedforget.simulations.processes import ProcessGroup

pytestmark = pytest.mark.e2e

README = SOURCE_TREE / "README.md"
PORT = "9092"


def walkthrough() -> tuple[dict[str, str], list[tuple[str, str]]]:
    text = README.read_text()
    files = dict(re.findall(r"<!-- dropin: file ([\w./-]+) -->\n```\w+\n(.*?)```", text, re.DOTALL))
    blocks = re.findall(r"<!-- dropin: (run|erase) -->\n```bash\n(.*?)```", text, re.DOTALL)
    assert sorted(files) == ["myapp/client_app.py", "myapp/server_app.py", "myapp/task.py", "pyproject.toml"]
    assert [name for name, _ in blocks] == ["run", "erase"], "the README walkthrough changed: update this test"
    return files, blocks


def test_the_readme_app_stays_unchanged_on_the_client_and_small_on_the_server() -> None:
    files, _ = walkthrough()
    for name in ("myapp/client_app.py", "myapp/task.py"):
        tree = ast.parse(files[name])
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not [module for module in imported if module.startswith("fedforget")], name
    added = [line for line in files["myapp/server_app.py"].splitlines() if "  # +" in line]
    assert 0 < len(added) <= 10, added


@pytest.mark.timeout(360)
def test_the_readme_dropin_walkthrough_works_when_pasted(tmp_path: Path) -> None:
    files, blocks = walkthrough()
    app = tmp_path / "app"
    for name, content in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(content)
    (app / "myapp" / "__init__.py").write_text("")
    port = str(free_port())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    processes = ProcessGroup(tmp_path / "logs", env=env)
    shell = processes.start("walkthrough", ["bash", "--noprofile", "--norc"], cwd=app, stdin=True)
    try:
        for step, (name, block) in enumerate(blocks):
            marker = f"__step_{step}_{name}_exit="
            assert shell.stdin is not None
            shell.stdin.write(f"{block.replace(PORT, port)}\necho {marker}$?\n".encode())
            shell.stdin.flush()
            found = wait_until(
                lambda: re.search(re.escape(marker) + r"(\d+)", processes.log("walkthrough")), 300,
                f"the README block {name!r} to finish",
            )
            log = processes.log("walkthrough")
            assert found.group(1) == "0", f"README block {name!r} failed:\n{log[-4000:]}"  # type: ignore[union-attr]
    finally:
        if shell.stdin:
            shell.stdin.close()
        left = processes.stop_all()
    log = processes.log("walkthrough")
    assert "client 1 unlearned in" in log and "VALID" in log and "INVALID" not in log
    assert "OK:" in log  # fedforget audit verify: the ledger matches the store

    state = app / "fedforget-state"
    with HistoryStore.open(state / "store") as store:
        events = [t.info for t in store.trajectories() if t.status == "complete"]
        first, second = events
        assert (first["clients"], first["strategy"], first["round"]) == (["1"], "retrain", 4)
        assert (second["clients"], second["strategy"], second["round"]) == (["0"], "fedrecovery", 6)
        assert first["client_epochs"] == 2 * 3 * 1.0  # 3 rounds replayed, 2 clients, local-epochs 1
        trained_on = store.reader(int(first["trajectory"]))  # type: ignore[call-overload]
        assert sorted(store.reader(1).clients()) == ["0", "1", "2"]
        assert [v.round for v in trained_on.rounds()] == [1, 2, 3, 4, 5]  # rounds kept counting
        assert "1" not in trained_on.clients()
    with Ledger.open(state / "state" / "ledger.jsonl") as ledger:
        origins = [e.body["initiated_by"] for e in ledger.entries() if e.kind == "unlearning"]
    assert origins == [{"1": "operator"}, {"0": "operator"}]
    for client, name in (("1", "client-1-round4.json"), ("0", "client-0-round6.json")):
        report = verify_certificate(state / "certificates" / name, app / "keys" / "federation.pub")
        assert report.valid, report.reason
        request = json.loads((state / "certificates" / name).read_text())["certificate"]["request"]
        assert request["client_id"] == client and request["initiated_by"] == "operator"
    assert not left, f"processes left behind: {left}"
