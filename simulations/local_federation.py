"""A fedforget federation of real processes on one machine, set up as the README's deployment section.

Used by ``fedforget bench deployment`` and the end-to-end tests.

Every step runs the same command a user pastes: ``fedforget certs``,
``fedforget export-data``, ``flower-superlink`` with TLS, node authentication
and a database, ``flwr supernode register``, ``fedforget enroll``,
``flower-supernode`` with the organisation's key, ``fedforget
withdrawal-service``, ``flwr run``, ``fedforget withdraw``. Nothing runs
in-process; state lives in files under one directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedforget.simulations.processes import ProcessGroup

SOURCE_TREE = Path(__file__).resolve().parents[1]
"""The project directory ``flwr run`` builds the app from (its pyproject.toml), in a source checkout."""
BIN = Path(sys.executable).parent
CONNECTION = "fedforget-local"
"""The name of the SuperLink connection in the federation's own FLWR_HOME."""
FEDERATION_ID = "local-federation"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str, *, every: float = 0.25) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class LoopbackFederation:
    """Credentials, data, SuperLink, SuperNodes and the withdrawal service of one local federation, under ``root``."""

    def __init__(self, root: Path, organisations: list[str], *, app_dir: Path = SOURCE_TREE) -> None:
        if "[tool.flwr.app]" not in _read(app_dir / "pyproject.toml"):
            raise FileNotFoundError(
                f"{app_dir} holds no Flower app (pyproject.toml with [tool.flwr.app]); run from a fedforget "
                "source checkout installed with `pip install -e .`"
            )
        self.app_dir = app_dir
        self.root = root.resolve()
        root = self.root
        self.organisations = organisations
        self.creds = root / "creds"
        self.data = root / "data"
        self.state = root / "server-state"
        self.superlink_db = root / "superlink" / "state.db"
        self.flwr_home = root / "flwr"
        self.superlink_port = free_port()
        self.service_port = free_port()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "GRPC_VERBOSITY": "ERROR",
        }
        self.processes = ProcessGroup(root / "logs", self.env)
        self.node_ids: dict[str, int] = {}

    # -- one-off commands ---------------------------------------------------------

    def command(self, *argv: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a CLI command to completion (``fedforget ...``, ``flwr ...``) with the federation's environment."""
        result = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(argv)}` exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def prepare(self) -> None:
        """Credentials for the server and each organisation, their data files, and the flwr connection."""
        orgs = [arg for name in self.organisations for arg in ("--org", name)]
        self.command("fedforget", "certs", "--out", str(self.creds), "--host", "127.0.0.1", "--host", "localhost", *orgs)
        self.command(
            "fedforget", "export-data", "--dataset", "digits", "--partitions", str(len(self.organisations)),
            "--out", str(self.data),
        )
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.superlink_port}"\n'
            f'root-certificates = "{self.creds / "ca.crt"}"\n'
        )
        self.superlink_db.parent.mkdir(parents=True, exist_ok=True)

    def data_file(self, organisation: str) -> Path:
        return self.data / f"part-{self.organisations.index(organisation)}.npz"

    # -- long-running processes ---------------------------------------------------

    def start_superlink(self) -> None:
        process = self.processes.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(self.creds / "ca.crt"),
                "--ssl-certfile", str(self.creds / "server.pem"),
                "--ssl-keyfile", str(self.creds / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.superlink_port),
                "--database", str(self.superlink_db),
            ],
        )
        self._wait_serving("superlink", process, self.superlink_port)

    def register(self, organisation: str) -> int:
        out = self.command(
            "flwr", "supernode", "register", str(self.creds / "orgs" / f"{organisation}.pub"), CONNECTION,
            "--name", organisation,
        ).stdout
        match = re.search(r"SuperNode (\d+) registered", out)
        if not match:
            raise RuntimeError(f"no node id in the output of flwr supernode register: {out}")
        self.node_ids[organisation] = int(match.group(1))
        return self.node_ids[organisation]

    def enroll(self, organisation: str) -> None:
        self.command(
            "fedforget", "enroll", organisation, str(self.creds / "orgs" / f"{organisation}.pub"),
            "--registry", str(self.state / "state" / "consent.sqlite"),
        )

    def start_supernode(
        self, organisation: str, *, name: str | None = None, key: Path | None = None, insecure: bool = False
    ) -> subprocess.Popen[bytes]:
        index = self.organisations.index(organisation) if organisation in self.organisations else 0
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--auth-supernode-private-key", str(key or self.creds / "orgs" / f"{organisation}.key"),
            "--node-config", f"data-file='{self.data / f'part-{index}.npz'}'",
            "--port", str(free_port()),
        ]
        argv += ["--insecure"] if insecure else ["--root-certificates", str(self.creds / "ca.crt")]
        return self.processes.start(name or f"supernode-{organisation}", argv)

    def start_withdrawal_service(self) -> None:
        process = self.processes.start(
            "withdrawal-service",
            [
                str(BIN / "fedforget"), "withdrawal-service",
                "--address", f"127.0.0.1:{self.service_port}",
                "--registry", str(self.state / "state" / "consent.sqlite"),
                "--federation", FEDERATION_ID,
                "--cert", str(self.creds / "server.pem"),
                "--key", str(self.creds / "server.key"),
            ],
        )
        self._wait_serving("withdrawal-service", process, self.service_port)

    def _wait_serving(self, name: str, process: subprocess.Popen[bytes], port: int) -> None:
        def serving() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.processes.log(name)[-2000:]}")
            return self.tls_handshake(port)

        wait_until(serving, 60, f"{name} to serve TLS on port {port}")

    def start_run(self, name: str, **settings: object) -> subprocess.Popen[bytes]:
        """``flwr run`` the fedforget app from the repository with the given run-config overrides."""
        config = {
            "state-dir": str(self.state),
            "federation-id": FEDERATION_ID,
            "signing-key": str(self.creds / "federation.key"),
            **settings,
        }
        rendered = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        return self.processes.start(
            name, [str(BIN / "flwr"), "run", str(self.app_dir), CONNECTION, "--stream", "--run-config", rendered]
        )

    def online_nodes(self) -> set[int]:
        out = self.command("flwr", "supernode", "list", CONNECTION, "--format", "json", check=False).stdout
        try:
            nodes = json.loads(out[out.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return set()
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def runs(self) -> dict[int, str]:
        """Run id -> status of every run the SuperLink knows (``flwr ls``)."""
        out = self.command("flwr", "ls", CONNECTION, "--format", "json").stdout
        return {int(r["run-id"]): str(r["status"]) for r in json.loads(out[out.index("{"):])["runs"]}

    # -- the organisations' side ------------------------------------------------

    def withdraw(self, organisation: str) -> str:
        """``fedforget withdraw`` as the organisation; returns the request id the service acknowledged."""
        out = self.command(
            "fedforget", "withdraw",
            "--server", f"127.0.0.1:{self.service_port}",
            "--ca", str(self.creds / "ca.crt"),
            "--key", str(self.creds / "orgs" / f"{organisation}.key"),
            "--client", organisation,
            "--federation", FEDERATION_ID,
            "--reason", "end-to-end test",
        ).stdout.strip()
        if not out or len(out.split()) != 1:
            raise RuntimeError(f"fedforget withdraw printed no request id: {out!r}")
        return out

    # -- what the server wrote ---------------------------------------------------

    def ledger(self, path: Path | None = None) -> list[dict[str, object]]:
        """The entries of the run's ledger (or of the ledger at ``path``, e.g. a shard's), complete lines only."""
        path = path or self.state / "state" / "ledger.jsonl"
        if not path.exists():
            return []
        entries = []
        for line in path.read_bytes().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a line being appended right now
        return entries

    def ledger_rounds(self) -> list[tuple[int, int]]:
        """(trajectory, round) of every round entry, in ledger order."""
        return [
            (int(e["body"]["trajectory"]), int(e["body"]["round"]))  # type: ignore[index]
            for e in self.ledger()
            if e.get("kind") == "round"
        ]

    @staticmethod
    def tls_handshake(port: int) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return True
        except OSError:
            return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value) + "'"


@contextmanager
def running_federation(root: Path, organisations: list[str]) -> Iterator[LoopbackFederation]:
    """Credentials, SuperLink, every organisation registered, enrolled and connected, and the withdrawal service.

    Every process is ended on the way out, and any left behind is an error
    (an end-to-end test must not leak processes into the next one).
    """
    fed = LoopbackFederation(root, organisations)
    try:
        fed.prepare()
        fed.start_superlink()
        for organisation in organisations:
            fed.register(organisation)
            fed.enroll(organisation)
            fed.start_supernode(organisation)
        fed.start_withdrawal_service()
        wait_until(
            lambda: fed.online_nodes() == set(fed.node_ids.values()), 60, f"the {len(organisations)} SuperNodes to connect"
        )
        yield fed
    finally:
        left = fed.processes.stop_all()
        if left:
            raise RuntimeError(f"processes left behind: {left}")
