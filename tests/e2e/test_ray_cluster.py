"""``fedforget simulate --ray-address`` on a Ray cluster of two nodes, each a separate ``ray start`` process.

The head and one extra worker node are started as the README says (one CPU
each), on this machine; the simulation connects to the head at 127.0.0.1.
Its two ClientApp actors must have run one on each node: the federation
really used the cluster, not a private Ray. Every Ray process is ended with
the test's process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedforget.simulations.local_federation import BIN, free_port, wait_until
from fedforget.simulations.processes import ProcessGroup

pytestmark = pytest.mark.e2e


CLUSTER_ENV = {
    **{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},  # 0 forbids a second node
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}


def _nodes_and_actors(address: str) -> dict[str, object]:
    """The cluster's alive nodes and the node of every ClientApp actor it ran, read in a separate driver.

    Ray's public state API (``ray list actors``) needs the dashboard, which the
    cluster runs without; the GCS's actor table holds the same facts.
    """
    script = (
        "import json, ray\n"
        "from ray._private.state import state\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
        "actors = [a['Address']['NodeID'] for a in state.actor_table(None).values()"
        " if a['ActorClassName'] == 'ClientAppActor']\n"
        "print(json.dumps({'nodes': nodes, 'actors': actors}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, env=CLUSTER_ENV
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, ProcessGroup]]:
    processes = ProcessGroup(tmp_path / "logs", CLUSTER_ENV)
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = Path("/tmp") / f"ffray-{port}"  # Ray's socket paths must stay short
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        processes.start("head", [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard",
                                 "false", "--temp-dir", str(temp), *common])
        wait_until(lambda: "Ray runtime started" in processes.log("head"), 120, "the Ray head to start")
        processes.start("worker", [str(BIN / "ray"), "start", "--address", address, *common])
        wait_until(lambda: "Ray runtime started" in processes.log("worker"), 120, "the Ray worker node to join")
        wait_until(lambda: len(_nodes_and_actors(address)["nodes"]) == 2, 60, "two alive nodes")  # type: ignore[arg-type]
        yield address, processes
    finally:
        left = processes.stop_all(grace=15.0)
        assert not left, f"Ray processes left behind: {left}"


@pytest.mark.timeout(420)
def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(cluster: tuple[str, ProcessGroup], tmp_path: Path):
    address, _ = cluster
    out = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "fedforget"), "simulate", "--dataset", "digits", "--clients", "3", "--rounds", "2",
         "--shadows", "0", "--ray-address", address, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=CLUSTER_ENV,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    seen = _nodes_and_actors(address)
    assert set(seen["actors"]) == set(seen["nodes"]) and len(seen["nodes"]) == 2, seen  # type: ignore[arg-type]
