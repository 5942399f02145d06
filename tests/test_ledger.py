"""Tests of the audit ledger (server/ledger/: entries, log, heads, queries) and ``fedforget audit`` (audit_cli.py).

The tamper matrix against a whole finished run is in test_tamper_matrix.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedforget.arrays import model_hash
from fedforget.errors import FedforgetError
from fedforget.identity import generate_keypair, load_private_key, load_public_key
from fedforget.server.ledger.audit import audit
from fedforget.commands.audit import audit_app
from fedforget.server.ledger.entries import GENESIS_HASH, LedgerBrokenError, LedgerEntry, LedgerError
from fedforget.server.ledger.heads import HeadsFile, sign_ledger
from fedforget.server.ledger.log import Ledger
from fedforget.server.ledger.queries import client_history
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.tree_head import ledger_json as canonical_json

runner = CliRunner()


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
        "steps": np.array(seed, dtype=np.int64),
    }


def fill(ledger: Ledger, n: int = 6) -> list[LedgerEntry]:
    """n round entries (trajectory 1, rounds 1..n), clients a and b."""
    return [
        ledger.record_round(
            trajectory=1,
            round=r,
            model_hash=h(f"model {r}"),
            participants=[
                {"client": "a", "num_examples": 10 + r, "update_hash": h(f"a{r}")},
                {"client": "b", "num_examples": 20 + r, "update_hash": None},
            ],
        )
        for r in range(1, n + 1)
    ]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The federation's signing key (private); its public half is next to it as ``federation.pub``."""
    keys = tmp_path_factory.mktemp("keys")
    generate_keypair(keys / "federation.key", keys / "federation.pub")
    return keys / "federation.key"


def sign(path: Path, signing_key: Path, federation: str = "fed-ledger") -> None:
    """Sign a head over the whole ledger at ``path``, as the server does after each round."""
    with Ledger.open(path) as led:
        sign_ledger(led, load_private_key(signing_key), federation, HeadsFile(path))


def broken(path: Path) -> LedgerBrokenError:
    with pytest.raises(LedgerBrokenError) as info:
        with Ledger.open(path, readonly=True) as led:
            led.verify()
    return info.value


# --------------------------------------------------------------------------- round trip


def test_append_verify_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "ledger.jsonl"
    with Ledger.open(path) as led:
        assert led.verify() == 0 and led.head() == (0, GENESIS_HASH)
        written = fill(led, 3)
        written.append(led.record_withdrawal_request(request_id="req-1", client="a", request_hash=h("req")))
        written.append(
            led.record_unlearning(
                clients=["a"],
                strategy="retrain",
                hyperparameters={"lr": 0.05, "epochs": (1, 2)},
                seed=np.int64(7),  # numpy scalars are converted
                round=4,
                model_hash_before=h("model 3"),
                model_hash_after=h("model 3'"),
                source_trajectory=1,
                trajectory=2,
                base_version=0,
                evidence={"membership_auc": np.float32(0.5), "backdoor_asr": None},
                key_destroyed=True,
            )
        )
        written.append(led.record_key_destroyed(client="a", destroyed_at="2025-01-01T00:00:00Z"))
        written.append(led.append("operator-note", {"text": "naïve ☃", "n": [1, 2.5, None, True]}))
        assert led.verify() == 7
        assert list(led.entries()) == written
    # the first entry links to the genesis hash, each later one to its predecessor
    assert written[0].previous_hash == GENESIS_HASH
    for before, after in zip(written, written[1:]):
        assert after.previous_hash == before.entry_hash and after.index == before.index + 1
    # the entry hash is sha256 over the canonical JSON of the five fields, as documented
    for entry in written:
        text = json.dumps(
            {k: v for k, v in entry.to_dict().items() if k != "entry_hash"},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        assert entry.entry_hash == hashlib.sha256(text.encode()).hexdigest()
    # one canonical, ASCII line per entry
    raw = lines_of(path)
    assert len(raw) == 7
    for line, entry in zip(raw, written):
        assert line == (canonical_json(entry.to_dict()) + "\n").encode("ascii")
    assert written[4].body["seed"] == 7 and written[4].body["hyperparameters"]["epochs"] == [1, 2]
    assert written[1].body["participants"][1]["update_hash"] is None
    # reopening continues the chain
    with Ledger.open(path) as led:
        nxt = led.append("operator-note", {"text": "again"})
        assert nxt.index == 7 and nxt.previous_hash == written[-1].entry_hash
        assert led.head() == (8, nxt.entry_hash)


def test_append_validates_kind_and_body(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path) as led:
        for kind in ("Round", "a_b", "", "round1", None):
            with pytest.raises(ValueError, match="kind"):
                led.append(kind, {})  # type: ignore[arg-type]
        for body in ({"x": object()}, {"x": float("nan")}, {"x": {1, 2}}, {1: "int key"}, ["not", "a", "dict"]):
            with pytest.raises(ValueError):
                led.append("note", body)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="model_hash"):
            led.record_round(trajectory=1, round=1, model_hash="abc", participants=[])
        with pytest.raises(ValueError, match="twice"):
            led.record_round(
                trajectory=1,
                round=1,
                model_hash=h("m"),
                participants=[{"client": "a", "num_examples": 1}, {"client": "a", "num_examples": 2}],
            )
        with pytest.raises(ValueError, match="round"):
            led.append("round", {"trajectory": 1, "model_hash": h("m"), "participants": []})
        with pytest.raises(ValueError, match="newer"):
            led.record_unlearning(
                clients=["a"], strategy="retrain", hyperparameters={}, seed=0, round=3,
                model_hash_before=h("x"), model_hash_after=h("y"), source_trajectory=2, trajectory=2,
                evidence=None, key_destroyed=False,
            )
        with pytest.raises(ValueError, match="base_version"):
            led.record_unlearning(
                clients=["a"], strategy="retrain", hyperparameters={}, seed=0, round=3,
                model_hash_before=h("x"), model_hash_after=h("y"), source_trajectory=1, trajectory=2,
                evidence=None, key_destroyed=False, base_version=3,
            )
        assert led.verify() == 0  # nothing was written
    assert path.read_bytes() == b""
    assert issubclass(LedgerBrokenError, LedgerError) and issubclass(LedgerError, FedforgetError)


def test_readonly_open(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path / "missing.jsonl", readonly=True)
    assert not (tmp_path / "missing.jsonl").exists()
    with Ledger.open(tmp_path / "l.jsonl") as led:
        fill(led, 1)
    with Ledger.open(tmp_path / "l.jsonl", readonly=True) as led:
        assert led.verify() == 1
        with pytest.raises(LedgerError, match="read-only"):
            led.append("note", {})


# --------------------------------------------------------------------------- tampering


@pytest.fixture()
def six(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path) as led:
        fill(led, 6)
    return path


def test_edited_body_byte_is_detected(six: Path) -> None:
    raw = lines_of(six)
    assert b'"num_examples":13' in raw[2]
    raw[2] = raw[2].replace(b'"num_examples":13', b'"num_examples":93')  # one byte
    six.write_bytes(b"".join(raw))
    err = broken(six)
    assert (err.index, err.kind, err.reason) == (2, "round", "hash mismatch")
    assert "entry 2 (round)" in str(err) and "hash mismatch" in str(err)


def test_edit_with_recomputed_hash_breaks_the_next_link(six: Path) -> None:
    raw = lines_of(six)
    doc = json.loads(raw[2])
    doc["body"]["participants"] = doc["body"]["participants"][1:]  # quietly drop client a
    doc["entry_hash"] = hashlib.sha256(
        canonical_json({k: v for k, v in doc.items() if k != "entry_hash"}).encode()
    ).hexdigest()
    raw[2] = (canonical_json(doc) + "\n").encode()
    six.write_bytes(b"".join(raw))
    err = broken(six)
    assert (err.index, err.reason) == (3, "bad link")


def test_non_canonical_line_is_detected(six: Path) -> None:
    raw = lines_of(six)
    raw[1] = (json.dumps(json.loads(raw[1]), sort_keys=True) + "\n").encode()  # same content, spaces added
    six.write_bytes(b"".join(raw))
    err = broken(six)
    assert (err.index, err.reason) == (1, "not canonical")


def test_reordered_pair_is_detected(six: Path) -> None:
    raw = lines_of(six)
    raw[2], raw[3] = raw[3], raw[2]
    six.write_bytes(b"".join(raw))
    err = broken(six)
    assert (err.index, err.kind, err.reason) == (2, "round", "bad sequence")


def test_deleted_entry_is_detected(six: Path) -> None:
    raw = lines_of(six)
    del raw[4]
    six.write_bytes(b"".join(raw))
    err = broken(six)
    assert (err.index, err.reason) == (4, "bad sequence")


def test_deleted_first_entry_is_detected(six: Path) -> None:
    six.write_bytes(b"".join(lines_of(six)[1:]))
    err = broken(six)
    assert (err.index, err.reason) == (0, "bad sequence")


def test_truncated_last_line_is_reported_not_dropped(six: Path) -> None:
    data = six.read_bytes()
    six.write_bytes(data[: len(data) - 40])  # crash mid-write of the last entry
    err = broken(six)
    assert (err.index, err.kind, err.reason) == (5, None, "unparseable")
    assert "entry 5" in str(err) and "entries 0..4 are intact" in str(err)
    # open() notices it too (cheap tail check), and so does an append on a handle opened before
    with pytest.raises(LedgerBrokenError) as info:
        Ledger.open(six)
    assert info.value.index == 5


def test_append_refuses_a_torn_tail_and_repair_records_itself(six: Path) -> None:
    led = Ledger.open(six)
    data = six.read_bytes()
    last = lines_of(six)[-1]
    six.write_bytes(data[:-10])
    with pytest.raises(LedgerBrokenError) as info:
        led.append("note", {"x": 1})
    assert info.value.index == 5
    led.close()
    assert six.read_bytes() == data[:-10]  # nothing appended onto the torn line
    entry = Ledger.repair(six)
    assert entry is not None and entry.kind == "ledger-repair" and entry.index == 5
    assert entry.body["dropped_bytes"] == len(last) - 10
    assert entry.body["dropped_sha256"] == hashlib.sha256(last[:-10]).hexdigest()
    with Ledger.open(six) as led:
        assert led.verify() == 6
        assert led.append("note", {"x": 1}).index == 6
    assert Ledger.repair(six) is None


def test_repair_refuses_other_damage(six: Path) -> None:
    raw = lines_of(six)
    raw[1] = raw[1].replace(b'"num_examples":12', b'"num_examples":13')
    six.write_bytes(b"".join(raw)[:-5])
    before = six.read_bytes()
    with pytest.raises(LedgerBrokenError) as info:
        Ledger.repair(six)
    assert info.value.index == 1
    assert six.read_bytes() == before


def test_anchor_detects_entries_removed_from_the_end(six: Path) -> None:
    with Ledger.open(six, readonly=True) as led:
        anchor = led.head()
        assert anchor[0] == 6
        assert led.verify(anchor=anchor) == 6
    six.write_bytes(b"".join(lines_of(six)[:-1]))
    with Ledger.open(six, readonly=True) as led:
        assert led.verify() == 5  # a shorter chain is still a valid chain...
        with pytest.raises(LedgerBrokenError) as info:
            led.verify(anchor=anchor)  # ...but not the one that was anchored
    assert info.value.reason == "missing entries"


def test_tampered_tail_is_caught_on_open(six: Path) -> None:
    raw = lines_of(six)
    raw[5] = raw[5].replace(b'"num_examples":16', b'"num_examples":61')
    six.write_bytes(b"".join(raw))
    with pytest.raises(LedgerBrokenError) as info:
        Ledger.open(six)
    assert (info.value.index, info.value.reason) == (5, "hash mismatch")


# --------------------------------------------------------------------------- model hash


def test_model_hash_is_stable_and_order_sensitive() -> None:
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -1], dtype=np.int64)}
    digest = model_hash(model)
    assert digest == "37f20170f553593f3e206cb6afb880a98d4f35d3f186290810589bef3729ca4c"  # pinned: a format change breaks old ledgers
    assert model_hash(dict(model)) == digest
    assert model_hash({"b": model["b"], "w": model["w"]}) != digest  # order
    assert model_hash({"w": model["w"].reshape(3, 2), "b": model["b"]}) != digest  # shape
    assert model_hash({"w": model["w"].astype(np.float64), "b": model["b"]}) != digest  # dtype
    assert model_hash({"W": model["w"], "b": model["b"]}) != digest  # name
    nudged = model["w"].copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(9))
    assert model_hash({"w": nudged, "b": model["b"]}) != digest  # one ulp
    assert model_hash({"w": model["w"].astype(">f4"), "b": model["b"].astype(">i8")}) == digest  # byte order
    assert model_hash({"w": np.asfortranarray(model["w"]), "b": model["b"]}) == digest  # memory layout
    # the same in a fresh process
    code = textwrap.dedent(
        """
        import numpy as np
        from fedforget.arrays import model_hash
        print(model_hash({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -1], dtype=np.int64)}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == digest
    with pytest.raises(ValueError):
        model_hash({"s": np.array(["text"])})


# --------------------------------------------------------------------------- client history


def _round(led: Ledger, traj: int, rnd: int, clients: list[str]) -> None:
    led.record_round(
        trajectory=traj,
        round=rnd,
        model_hash=h(f"{traj}/{rnd}"),
        participants=[{"client": c, "num_examples": 10, "update_hash": h(f"{traj}/{rnd}/{c}")} for c in clients],
    )


def _unlearn(led: Ledger, *, round: int, base: int | None, strategy: str = "retrain", clients=("c",)) -> None:
    led.record_unlearning(
        clients=list(clients),
        strategy=strategy,
        hyperparameters={"local_epochs": 1.0},
        seed=0,
        round=round,
        model_hash_before=h(f"1/{round - 1}"),
        model_hash_after=h(f"2/{round - 1}"),
        source_trajectory=1,
        trajectory=2,
        evidence={"membership_auc": 0.51},
        key_destroyed=True,
        base_version=base,
    )


@pytest.mark.parametrize("record_base", [True, False])
def test_client_history_retrain_scenario(tmp_path: Path, record_base: bool) -> None:
    """c in rounds 1..5 of trajectory 1; unlearned before round 6 into trajectory 2
    (base 0, rounds 1..5 retrained without it); training continues in trajectory 2."""
    with Ledger.open(tmp_path / "ledger.jsonl") as led:
        for r in range(1, 6):
            _round(led, 1, r, ["a", "b", "c"])
        led.record_withdrawal_request(request_id="w1", client="c", request_hash=h("w1"))
        for r in range(1, 6):
            _round(led, 2, r, ["a", "b"])
        _unlearn(led, round=6, base=0 if record_base else None)
        for r in range(6, 9):
            _round(led, 2, r, ["a", "b"])
        c = client_history(led, "c")
        a = client_history(led, "a")
        nobody = client_history(led, "zed")
    assert c.participated == [(1, r) for r in range(1, 6)]
    assert c.contained == [(1, r) for r in range(1, 6)]
    assert c.not_contained == [(2, r) for r in range(1, 9)]
    assert c.clean_versions == [(2, 1)]
    assert [e["strategy"] for e in c.removed_by] == ["retrain"] and c.removed_by[0]["index"] == 11
    assert [e["request_id"] for e in c.withdrawal_requests] == ["w1"]
    assert [e["index"] for e in c.keys_destroyed] == [11]
    assert c.contains(1, 5) is True and c.contains(2, 5) is False and c.contains(2, 8) is False
    assert c.contains(3, 1) is None and c.contains(1, 9) is None
    # a client that stays is in every version of both trajectories
    assert a.contained == [(1, r) for r in range(1, 6)] + [(2, r) for r in range(1, 9)]
    assert a.removed_by == [] and a.clean_versions == []
    assert nobody.contained == [] and len(nobody.not_contained) == 13


def test_client_history_approximate_unlearning_shares_earlier_versions(tmp_path: Path) -> None:
    """subtract-style: the fork shares versions 0..4 with trajectory 1; version 5 is the unlearned model."""
    with Ledger.open(tmp_path / "ledger.jsonl") as led:
        for r in range(1, 6):
            _round(led, 1, r, ["a", "c"] if r >= 2 else ["a"])
        _round(led, 2, 5, [])  # the strategy's own version, no participants
        _unlearn(led, round=6, base=4, strategy="subtract")
        _round(led, 2, 6, ["a"])
        c = client_history(led, "c")
        a = client_history(led, "a")
    assert c.contained == [(1, r) for r in range(2, 6)] + [(2, r) for r in range(2, 5)]
    assert c.not_contained == [(1, 1), (2, 1), (2, 5), (2, 6)]
    assert c.clean_versions == [(2, 5)]
    assert a.contained == [(1, r) for r in range(1, 6)] + [(2, r) for r in range(1, 7)]


def test_client_history_client_that_rejoins(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.jsonl") as led:
        for r in range(1, 4):
            _round(led, 1, r, ["a", "c"])
        _unlearn(led, round=4, base=0)
        for r in range(1, 6):
            _round(led, 2, r, ["a", "c"] if r == 5 else ["a"])
        c = client_history(led, "c")
    assert c.contained == [(1, 1), (1, 2), (1, 3), (2, 5)]
    assert c.clean_versions == [(2, 1)]


def test_client_history_refuses_a_broken_ledger(six: Path) -> None:
    raw = lines_of(six)
    raw[0] = raw[0].replace(b'"num_examples":11', b'"num_examples":12')
    six.write_bytes(b"".join(raw))
    with Ledger.open(six, readonly=True) as led, pytest.raises(LedgerBrokenError) as info:
        client_history(led, "a")
    assert info.value.index == 0


# --------------------------------------------------------------------------- concurrency


def test_concurrent_appends_from_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from fedforget.server.ledger.log import Ledger
        name = sys.argv[2]
        with Ledger.open(Path(sys.argv[1])) as led:
            go = Path(sys.argv[1] + ".go")
            while not go.exists():  # both processes start appending at the same moment
                time.sleep(0.005)
            for i in range(50):
                led.append("note", {"writer": name, "i": i})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in ("p", "q")]
    path.with_name(path.name + ".go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with Ledger.open(path, readonly=True) as led:
        assert led.verify() == 100
        entries = list(led.entries())
    assert [e.index for e in entries] == list(range(100))
    for name in ("p", "q"):
        assert [e.body["i"] for e in entries if e.body["writer"] == name] == list(range(50))


def test_two_handles_in_one_process_link_correctly(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path) as one, Ledger.open(path) as two:
        for i in range(5):
            one.append("note", {"i": i})
            two.append("note", {"i": i})
        assert two.verify() == 10


# --------------------------------------------------------------------------- CLI


def _out(result) -> str:  # noqa: ANN001
    return " ".join(result.output.split())


def test_cli_help() -> None:
    for command in ([], ["verify"], ["client"], ["repair"], ["checkpoint"]):
        result = runner.invoke(audit_app, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def _verify(six: Path, signing_key: Path, *extra: str):  # noqa: ANN202
    return runner.invoke(audit_app, ["verify", "--ledger", str(six), "--server-key", str(signing_key.with_suffix(".pub")), *extra])


def test_cli_verify_ok_and_broken(six: Path, signing_key: Path) -> None:
    sign(six, signing_key)
    result = _verify(six, signing_key)
    assert result.exit_code == 0, result.output
    assert "OK: 6 entries" in result.output
    anchor = result.output.split("; head ")[1].split(";")[0]
    assert _verify(six, signing_key, "--anchor", anchor).exit_code == 0

    raw = lines_of(six)
    raw[3] = raw[3].replace(b'"num_examples":14', b'"num_examples":15')
    six.write_bytes(b"".join(raw))
    result = _verify(six, signing_key)
    assert result.exit_code == 1  # a check that failed, not a usage error
    assert "entry 3 (round)" in _out(result) and "hash mismatch" in _out(result)

    missing = runner.invoke(audit_app, ["verify", "--ledger", str(six.parent / "nope.jsonl"), "--server-key", str(signing_key.with_suffix(".pub"))])
    assert missing.exit_code == 3 and "no ledger" in _out(missing)
    assert not (six.parent / "nope.jsonl").exists()
    no_key = runner.invoke(audit_app, ["verify", "--ledger", str(six)])
    assert no_key.exit_code == 2 and "--server-key" in _out(no_key)


def test_cli_verify_needs_a_head_signed_with_the_federation_key(six: Path, signing_key: Path, tmp_path: Path) -> None:
    result = _verify(six, signing_key)
    assert result.exit_code == 1 and "no signed tree head" in _out(result)
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign(six, tmp_path / "other.key")  # signed, but not by the federation
    result = _verify(six, signing_key)
    assert result.exit_code == 1 and "not the federation key given" in _out(result)


def test_cli_verify_anchor_catches_a_cut_end(six: Path, signing_key: Path) -> None:
    sign(six, signing_key)
    anchor = _verify(six, signing_key).output.split("; head ")[1].split(";")[0]
    six.write_bytes(b"".join(lines_of(six)[:-2]))
    result = _verify(six, signing_key, "--anchor", anchor)
    assert result.exit_code == 1 and "missing entries" in _out(result)
    bad = _verify(six, signing_key, "--anchor", "nonsense")
    assert bad.exit_code == 2 and "COUNT:HASH" in _out(bad)


def test_cli_checkpoint_then_a_rewrite_is_caught(six: Path, signing_key: Path, tmp_path: Path) -> None:
    sign(six, signing_key)
    checkpoint = tmp_path / "held" / "checkpoint.json"
    saved = runner.invoke(audit_app, ["checkpoint", "--ledger", str(six), "--server-key", str(signing_key.with_suffix(".pub")), "--out", str(checkpoint)])
    assert saved.exit_code == 0, saved.output
    assert json.loads(checkpoint.read_text())["head"]["tree_size"] == 6
    with Ledger.open(six) as led:
        led.append("operator-note", {"text": "later"})
    sign(six, signing_key)
    assert _verify(six, signing_key, "--checkpoint", str(checkpoint)).exit_code == 0  # growth is fine
    # The operator rewrites history (drops entry 2, re-links the chain) and re-signs with the federation key:
    # every head in the state directory is consistent again, but the checkpoint held elsewhere is not.
    entries = [json.loads(line) for line in six.read_text().splitlines()]
    del entries[2]
    previous, out = GENESIS_HASH, []
    from fedforget.server.ledger.entries import entry_hash_of

    for index, entry in enumerate(entries):
        entry.update(index=index, previous_hash=previous)
        entry["entry_hash"] = previous = entry_hash_of(index, entry["kind"], entry["timestamp"], entry["body"], previous)
        out.append(canonical_json(entry) + "\n")
    six.write_text("".join(out))
    (six.parent / "ledger-heads.jsonl").unlink()
    sign(six, signing_key)
    assert _verify(six, signing_key).exit_code == 0  # nothing in the directory shows it ...
    result = _verify(six, signing_key, "--checkpoint", str(checkpoint))
    assert result.exit_code == 1 and "not an extension of its head" in _out(result)  # ... the checkpoint does


def test_a_server_refuses_to_sign_over_an_edited_ledger(six: Path, signing_key: Path) -> None:
    sign(six, signing_key)
    six.write_bytes(b"".join(lines_of(six)[:-1]))  # cut, then appended to: a valid chain again
    with Ledger.open(six) as led:
        led.append("operator-note", {"text": "covering up"})
    with pytest.raises(LedgerError, match="refusing to sign"):
        sign(six, signing_key)


def test_cli_client(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path) as led:
        for r in range(1, 6):
            _round(led, 1, r, ["a", "b", "c"])
        for r in range(1, 6):
            _round(led, 2, r, ["a", "b"])
        _unlearn(led, round=6, base=0)
        led.record_key_destroyed(client="c", key_ids=[3], destroyed_at="2025-01-01T00:00:00Z")
        _round(led, 2, 6, ["a", "b"])
    result = runner.invoke(audit_app, ["client", "c", "--ledger", str(path)])
    assert result.exit_code == 0, result.output
    text = _out(result)
    assert "1-5" in text and "1-6" in text and "retrain" in text and "trajectory 2 from version 1" in text
    assert text.count("data key destroyed") == 1  # the unlearning and its key-destroyed entry: one destruction
    as_json = runner.invoke(audit_app, ["client", "c", "--ledger", str(path), "--json"])
    assert as_json.exit_code == 0
    doc = json.loads(as_json.output)
    assert doc["contained"] == [[1, r] for r in range(1, 6)] and doc["clean_versions"] == [[2, 1]]
    assert [d["kind"] for d in doc["keys_destroyed"]] == ["key-destroyed"]
    unknown = runner.invoke(audit_app, ["client", "zed", "--ledger", str(path)])
    assert unknown.exit_code == 0 and "appears in no entry" in _out(unknown)
    missing = runner.invoke(audit_app, ["client", "c", "--ledger", str(tmp_path / "nope")])
    assert missing.exit_code == 3 and "error:" in missing.output  # a file that cannot be used


def test_cli_repair(six: Path, signing_key: Path) -> None:
    sign(six, signing_key)
    result = runner.invoke(audit_app, ["repair", "--ledger", str(six)])
    assert result.exit_code == 0 and "nothing to repair" in result.output
    six.write_bytes(six.read_bytes()[:-7])
    assert _verify(six, signing_key).exit_code == 1
    result = runner.invoke(audit_app, ["repair", "--ledger", str(six)])
    assert result.exit_code == 0 and "entry 5" in result.output
    unsigned = _verify(six, signing_key)  # the repair entry is not under a signed head yet
    assert unsigned.exit_code == 1 and "not covered by any tree head" in _out(unsigned)
    # ... the signed head of 6 entries no longer matches: the last entry was replaced by the repair record
    assert "no longer hash to the signed Merkle root" in _out(unsigned)


# --------------------------------------------------------------------------- against the history store


def _tiny_store(path: Path) -> dict[int, str]:
    """Two rounds of client a, then a retrain fork; returns the model blob of each version of trajectory 1."""
    m0 = tiny_model(0)
    with HistoryStore.create(path, federation_id="fed-ledger", model_spec=ModelSpec.from_arrays(m0)) as store:
        store.write_initial_model(m0)
        for r in (1, 2):
            store.record_update(r, "a", tiny_model(100 + r), num_examples=5, weight=1.0)
            store.commit_round(r, tiny_model(r))
        store.fork(base_version=0, info={"kind": "unlearning"})
        store.commit_round(1, tiny_model(11))
        store.commit_round(2, tiny_model(12))
        return {trajectory: [store.committed_round(trajectory, r) for r in (1, 2)] for trajectory in (1, 2)}  # type: ignore[return-value]


def test_audit_against_the_store_names_each_disagreement(tmp_path: Path, signing_key: Path) -> None:
    store_path, ledger_path = tmp_path / "store", tmp_path / "ledger.jsonl"
    committed = _tiny_store(store_path)
    with Ledger.open(ledger_path) as led:
        for trajectory in (1, 2):
            for c in committed[trajectory]:  # type: ignore[attr-defined]
                led.record_round(
                    trajectory=trajectory, round=c.round, model_hash=model_hash(tiny_model(c.round + 10 * (trajectory - 1))),
                    model_blob=c.model_blob,
                    participants=[{"client": p.client_id, "num_examples": p.num_examples, "weight": p.weight,
                                   "update_hash": p.update_hash, "blob": p.blob_id} for p in c.participants],
                )  # fmt: skip
        led.record_unlearning(
            clients=["a"], strategy="retrain", hyperparameters={}, seed=0, round=3,
            model_hash_before=model_hash(tiny_model(2)), model_hash_after=model_hash(tiny_model(12)),
            source_trajectory=1, trajectory=2, evidence=None, key_destroyed=False, base_version=0,
        )
    sign(ledger_path, signing_key)
    key = load_public_key(signing_key.with_suffix(".pub"))
    assert audit(ledger_path, key, store=store_path).ok

    with Ledger.open(ledger_path) as led:  # a round whose recorded model is not the stored one, and one the store lacks
        led.record_round(trajectory=2, round=3, model_hash=model_hash(tiny_model(99)), participants=[])
    sign(ledger_path, signing_key)
    messages = [str(f) for f in audit(ledger_path, key, store=store_path).findings.errors]
    assert messages == [
        "error: ledger entry 5 (round): records round 3 of trajectory 2, which the history store does not hold"
    ], messages


def test_a_head_line_a_crash_cut_short_is_dropped_at_the_next_signing(six: Path, signing_key: Path) -> None:
    from fedforget.server.ledger.heads import read_heads

    sign(six, signing_key)
    heads = six.parent / "ledger-heads.jsonl"
    heads.write_bytes(heads.read_bytes() + b'{"head":{"federation_id":"fed-led')  # killed mid-append
    result = _verify(six, signing_key)
    assert result.exit_code == 0 and "warning:" in result.output and "incomplete last line" in _out(result)
    with Ledger.open(six) as led:
        led.append("operator-note", {"text": "after the crash"})
    sign(six, signing_key)
    assert [r.problem for r in read_heads(heads)] == [None, None]
    assert _verify(six, signing_key).exit_code == 0


def test_cli_repair_after_a_crash_mid_append_and_sign(six: Path, signing_key: Path) -> None:
    sign(six, signing_key)
    with open(six, "ab") as handle:  # the server died while appending entry 6, before signing it
        handle.write(b'{"body":{"round":7,"traj')
    assert _verify(six, signing_key).exit_code == 1
    result = runner.invoke(audit_app, ["repair", "--ledger", str(six), "--signing-key", str(signing_key)])
    assert result.exit_code == 0, result.output
    verified = _verify(six, signing_key)
    assert verified.exit_code == 0, verified.output
    assert "OK: 7 entries" in verified.output  # six rounds and the repair record, all under a signed head
