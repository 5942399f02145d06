"""A sharded deployment (run config ``shards=2``) as real processes: a signed withdrawal retrains one shard only.

SuperLink (TLS, SuperNode authentication) + three SuperNodes + the withdrawal
service, started by the README's deployment commands. The run splits the
three organisations into two shards; an organisation of the two-organisation
shard withdraws with ``fedforget withdraw`` while the shards train. Only its shard is unlearned: that shard's
ledger and certificate say so, the other shard's ledger records every round
with both of its organisations and no unlearning, and ``fedforget audit
client --state`` finds the organisation's shard from the state directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fedforget.sharding import load_assignment, shard_dir
from fedforget.simulations.local_federation import LoopbackFederation, running_federation, wait_until

pytestmark = pytest.mark.e2e

ORGANISATIONS = ["org-a", "org-b", "org-c"]
ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackFederation]:
    with running_federation(tmp_path_factory.mktemp("sharded"), ORGANISATIONS) as fed:
        yield fed


def _rounds(entries: list[dict]) -> list[dict]:
    return [e["body"] for e in entries if e["kind"] == "round"]


@pytest.mark.timeout(300)
def test_a_signed_withdrawal_retrains_only_its_shard(federation: LoopbackFederation) -> None:
    fed = federation
    run = fed.start_run("sharded-run", **{"num-rounds": ROUNDS, "min-nodes": len(ORGANISATIONS), "shards": 2})
    assignment_file = fed.state / "shards.json"
    wait_until(assignment_file.exists, 120, "the run to form its shards")
    assignment = load_assignment(assignment_file)
    own = next(index for index, members in enumerate(assignment.shards) if len(members) == 2)
    other, leaving = 1 - own, assignment.shards[own][0]
    ledgers = {index: fed.state / "shards" / f"shard-{index}" / "state" / "ledger.jsonl" for index in (0, 1)}
    wait_until(lambda: _rounds(fed.ledger(ledgers[own])), 120, "a round in the shard's ledger")

    fed.withdraw(leaving)
    assert run.wait(timeout=240) == 0, fed.processes.log("sharded-run")[-3000:]

    # The withdrawing organisation's shard: unlearned once, by an entry naming the shard, and trained without it after.
    own_entries = fed.ledger(ledgers[own])
    (unlearning,) = [e["body"] for e in own_entries if e["kind"] == "unlearning"]
    scope = {"index": own, "count": 2, "clients": list(assignment.shards[own])}
    assert unlearning["clients"] == [leaving] and unlearning["shard"] == scope
    stayed = sorted(set(assignment.shards[own]) - {leaving})
    final = [r for r in _rounds(own_entries) if r["trajectory"] == unlearning["trajectory"]]
    assert final and all(sorted(p["client"] for p in r["participants"]) == stayed for r in final)

    # The other shard: every round with both its organisations, one trajectory, no unlearning.
    other_entries = fed.ledger(ledgers[other])
    assert not [e for e in other_entries if e["kind"] == "unlearning"]
    other_rounds = _rounds(other_entries)
    assert [(r["trajectory"], r["round"]) for r in other_rounds] == [(1, t) for t in range(1, ROUNDS + 1)]
    assert all(sorted(p["client"] for p in r["participants"]) == list(assignment.shards[other]) for r in other_rounds)

    # The organisation checks its certificate, and an auditor finds its shard from the state directory.
    (certificate,) = (shard_dir(fed.state, own) / "certificates").glob("*.json")
    checked = fed.command(
        "fedforget", "client", "verify-certificate", str(certificate), "--server-key", str(fed.creds / "federation.pub")
    ).stdout
    assert checked.startswith("VALID") and f"only in shard {own} " in checked, checked
    audit = json.loads(fed.command("fedforget", "audit", "client", leaving, "--state", str(fed.state), "--json").stdout)
    assert audit["shard"] == scope
    assert [e["index"] for e in audit["removed_by"]] == [e["index"] for e in own_entries if e["kind"] == "unlearning"]
    for index in (0, 1):
        fed.command(
            "fedforget", "audit", "verify", "--ledger", str(ledgers[index]),
            "--server-key", str(fed.creds / "federation.pub"), "--store", str(shard_dir(fed.state, index) / "store"),
        )
    report = json.loads((fed.state / "report.json").read_text())
    assert [s["clients"] for s in report["shards"]] == [list(s) for s in assignment.shards]
