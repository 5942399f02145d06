"""The simulated organisations' own side of a withdrawal: sign a request, send it to the service.

``fedforget simulate --withdraw CLIENT@ROUND`` takes the same path a real
organisation does: before round ROUND the client signs a withdrawal with its
own key and submits it over TLS to the withdrawal service; the server learns
of it only from the consent registry. There is no simulation-only shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedforget.client.withdraw import submit_withdrawal
from fedforget.identity import generate_keypair, load_public_key, public_key_openssh
from fedforget.pki import ServerTLS, create_server_tls
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.server.withdrawal.registry import ConsentRegistry
from fedforget.server.rounds.loop import RunObserver
from fedforget.server.state_dir import StateDir


@dataclass(frozen=True)
class FederationPaths:
    """Where a simulated federation keeps its keys, TLS material and server state."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def registry(self) -> Path:
        return StateDir(self.root).registry

    @property
    def ledger(self) -> Path:
        return StateDir(self.root).ledger

    @property
    def certificates(self) -> Path:
        return StateDir(self.root).certificates

    @property
    def server_key(self) -> Path:
        return self.keys / "server.key"

    @property
    def server_public_key(self) -> Path:
        return self.keys / "server.pub"

    def client_key(self, client: str) -> Path:
        return self.keys / f"client-{client}.key"

    def tls(self) -> ServerTLS:
        return ServerTLS(self.pki / "ca.crt", self.pki / "server.pem", self.pki / "server.key")


def prepare_federation(paths: FederationPaths, clients: Sequence[str]) -> None:
    """Keys for the server and each client, loopback TLS, and the clients enrolled (kept on resume)."""
    if not paths.server_key.exists():
        generate_keypair(paths.server_key, paths.server_public_key, comment="federation server")
    if not (paths.pki / "ca.crt").exists():
        create_server_tls(paths.pki, ["127.0.0.1", "localhost"])
    paths.registry.parent.mkdir(parents=True, exist_ok=True)
    with ConsentRegistry.open(paths.registry) as registry:
        for client in clients:
            private, public = paths.client_key(client), paths.keys / f"client-{client}.pub"
            if not private.exists():
                generate_keypair(private, public, comment=f"simulated organisation {client}")
            registry.enroll(client, public_key_openssh(load_public_key(public)))


class WithdrawingClients:
    """Run observer standing in for the withdrawing organisations: they submit before their round."""

    def __init__(
        self,
        inner: RunObserver,
        schedule: Sequence[Withdrawal],
        paths: FederationPaths,
        service_address: str,
        federation_id: str,
    ) -> None:
        self._inner = inner
        self._schedule = list(schedule)
        self._paths = paths
        self._address = service_address
        self._federation_id = federation_id
        self.request_ids: dict[str, str] = {}

    def round_starting(self, server_round: int) -> None:
        with ConsentRegistry.open(self._paths.registry) as registry:
            already = {r.client_id for r in registry.requests()}
        for withdrawal in self._schedule:
            if withdrawal.round <= server_round and withdrawal.client_id not in already:
                self.request_ids[withdrawal.client_id] = submit_withdrawal(
                    self._address,
                    self._paths.tls().ca_certificate,
                    self._paths.client_key(withdrawal.client_id),
                    withdrawal.client_id,
                    self._federation_id,
                    reason=f"simulated withdrawal before round {withdrawal.round}",
                )
        self._inner.round_starting(server_round)

    def run_started(self, first_round: int, num_rounds: int) -> None:
        self._inner.run_started(first_round, num_rounds)

    def round_finished(self, entry: dict[str, object]) -> None:
        self._inner.round_finished(entry)

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None:
        self._inner.unlearning_started(clients, before_round, strategy)

    def unlearning_step(self, step: str) -> None:
        self._inner.unlearning_step(step)

    def unlearning_finished(self, event: dict[str, object]) -> None:
        self._inner.unlearning_finished(event)
