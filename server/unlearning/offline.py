"""Unlearning while no federated run is active: ``fedforget unlearn``.

Two ways in, one coordinator (the round loop's and the Python API's):

- **a client's request** (``--state``): a client may withdraw between runs,
  or after it has left. Its signed request waits in the consent registry; a
  strategy that needs no client work (``fedrecovery``, or ``subtract`` with
  no recovery rounds) acts on it at once, and
  the request is marked done with its certificate.
- **an operator's erasure** (``--store``): the federation's operator erases
  a client from any recorded store (one the Python API recorded, too), with
  no withdrawal service and no request, for a stated reason. The ledger and
  the certificate say it was operator-initiated.

Both do the same bookkeeping as inside a run: a new trajectory,
crypto-shredding, and with a signing key the ledger entries and a signed
certificate. Every input is checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from fedforget.errors import FedforgetError
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.state_dir import StateDir
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.coordinator import UnlearningCoordinator, check_unlearnable
from fedforget.server.withdrawal.consent import ConsentSource, RegistryConsent, WithdrawalNotice
from fedforget.strategies.base import Unlearner
from fedforget.strategies.registry import StrategyChoice


class OfflineUnlearningError(FedforgetError):
    """The requested offline unlearning cannot run; the message says what to do instead."""


def unlearn_requested(*, state: StateDir, client: str, strategy: StrategyChoice, signing_key: Path) -> dict[str, object]:
    """Act now on ``client``'s accepted withdrawal request in ``state``'s consent registry; return the event."""
    unlearner = _offline_unlearner(strategy, "let the next run's start act on the request")
    if not state.registry.is_file():
        raise OfflineUnlearningError(
            f"there is no consent registry at {state.registry}, so no client has withdrawn through the "
            "withdrawal service; to erase a client without its request, use --store with --reason"
        )
    consent = RegistryConsent(state.registry)
    notices = [n for n in consent.due(0, set()) if n.client_id == client]
    if not notices:
        raise OfflineUnlearningError(
            f"the consent registry {state.registry} holds no open withdrawal request from client {client!r}; "
            "the client must first submit one (fedforget withdraw request), or the operator erases it with "
            "--store and --reason"
        )
    return _unlearn(state.store, state, notices, unlearner, signing_key, consent)


def erase(
    *, store_dir: Path, client: str, strategy: StrategyChoice, reason: str, signing_key: Path | None
) -> dict[str, object]:
    """Erase ``client`` from the history in ``store_dir`` on the operator's word; return the event.

    With ``signing_key`` the erasure goes into the ledger beside the store
    (``STORE/../state/ledger.jsonl``) and gets a certificate in
    ``STORE/../certificates``. Without one, a store that already keeps a
    ledger is refused, since the ledger would no longer match it.
    """
    if not reason.strip():
        raise OfflineUnlearningError("say why the client is erased: --reason \"...\" is recorded with the erasure")
    unlearner = _offline_unlearner(strategy, "or unlearn inside a run, where the clients are connected")
    state = StateDir(Path(store_dir).resolve().parent)
    if signing_key is None and state.ledger.exists():
        raise OfflineUnlearningError(
            f"the store keeps a ledger ({state.ledger}) in which every unlearning must be recorded and "
            "certified: pass --signing-key with the federation's key"
        )
    notice = WithdrawalNotice.by_operator(client, reason)
    return _unlearn(Path(store_dir), state, [notice], unlearner, signing_key, None, only_recorded=True)


def _offline_unlearner(choice: StrategyChoice, otherwise: str) -> Unlearner:
    unlearner = choice.build()
    if unlearner.needs_client_work:
        raise OfflineUnlearningError(
            f"strategy {choice.name!r} with these settings needs work from the remaining clients, which no run "
            f"is there to do; use --strategy fedrecovery, or subtract with --recovery-rounds 0, {otherwise}"
        )
    return unlearner


def _unlearn(
    store_dir: Path,
    state: StateDir,
    notices: list[WithdrawalNotice],
    unlearner: Unlearner,
    signing_key: Path | None,
    consent: ConsentSource | None,
    *,
    only_recorded: bool = False,
) -> dict[str, object]:
    if signing_key is not None and not signing_key.is_file():
        raise OfflineUnlearningError(
            f"signing key {signing_key} does not exist: give the federation's private key with --signing-key"
        )
    with HistoryStore.open(store_dir) as store:
        check_unlearnable(store, [notice.client_id for notice in notices], must_be_recorded=only_recorded)
        accountability = None
        if signing_key is not None:
            accountability = Accountability(
                ledger_path=state.ledger, server_key=signing_key, certificates_dir=state.certificates,
                federation_id=store.federation_id,
            )
        coordinator = UnlearningCoordinator(RecordingFedAvg(store), accountability=accountability, consent=consent)
        coordinator.prepare()
        return coordinator.unlearn(None, notices, unlearner).event
