"""The tamper matrix: hand-made edits an insider with disk access (but no federation key) could make.

Each case edits a fresh copy of one finished run (blobs, every column of every
index table, the ledger and its heads) and must be caught by ``fedforget
audit verify`` (exit code 1), whose output must name what was changed. The
unedited copy must pass, and the audit must leave every file bit-identical,
also on a read-only mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from finished_run import FinishedRun, make_finished_run
from typer.testing import CliRunner

from fedforget.commands.audit import audit_app
from fedforget.server.ledger.entries import entry_hash_of
from fedforget.tree_head import ledger_json


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    return make_finished_run(tmp_path_factory.mktemp("finished"))


def _audit(run: FinishedRun) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, run.audit_args())
    return result.exit_code, " ".join(result.output.split())


# --------------------------------------------------------------------------- helpers that edit


@contextmanager
def _db(run: FinishedRun) -> Iterator[sqlite3.Connection]:
    """A connection of any SQLite client, closed (and so checkpointed) when the edit is done."""
    conn = sqlite3.connect(run.files.store / "index.sqlite", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _current(run: FinishedRun) -> int:
    with _db(run) as conn:
        return int(conn.execute("SELECT value FROM state WHERE key = 'current_trajectory'").fetchone()[0])


def _update_blob(run: FinishedRun, round_: int, client: str) -> Path:
    with _db(run) as conn:
        (blob_id,) = conn.execute(
            "SELECT blob_id FROM updates WHERE trajectory = ? AND round = ? AND client_id = ?", (_current(run), round_, client)
        ).fetchone()
    return run.files.store / "blobs" / f"{blob_id}.ffb"


def _model_blob(run: FinishedRun, version: int) -> Path:
    with _db(run) as conn:
        (blob_id,) = conn.execute(
            "SELECT blob_id FROM versions WHERE trajectory = ? AND version = ?", (_current(run), version)
        ).fetchone()
    return run.files.store / "blobs" / f"{blob_id}.ffb"


def _sql(statement: str) -> Callable[[FinishedRun], None]:
    """An edit made with any SQLite client; ``{t}`` is the current trajectory."""

    def edit(run: FinishedRun) -> None:
        with _db(run) as conn:
            changed = conn.execute(statement.format(t=_current(run))).rowcount
        assert changed >= 1, f"the edit changed nothing: {statement}"

    return edit


def _flip_byte(path_of: Callable[[FinishedRun], Path], offset: int = 100) -> Callable[[FinishedRun], None]:
    def edit(run: FinishedRun) -> None:
        path = path_of(run)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))

    return edit


def _ledger_lines(run: FinishedRun) -> list[dict]:
    return [json.loads(line) for line in run.files.ledger.read_text().splitlines()]


def _write_chained(run: FinishedRun, entries: list[dict]) -> None:
    """Write entries back re-linked: indexes, previous hashes and entry hashes recomputed (no secret needed)."""
    previous, lines = "0" * 64, []
    for index, entry in enumerate(entries):
        entry = {**entry, "index": index, "previous_hash": previous}
        entry["entry_hash"] = entry_hash_of(index, entry["kind"], entry["timestamp"], entry["body"], previous)
        previous = entry["entry_hash"]
        lines.append(ledger_json(entry) + "\n")
    run.files.ledger.write_text("".join(lines))


def _delete_and_rechain(position: int) -> Callable[[FinishedRun], None]:
    def edit(run: FinishedRun) -> None:
        entries = _ledger_lines(run)
        del entries[position]
        _write_chained(run, entries)

    return edit


def _append_forged(make_body: Callable[[list[dict]], tuple[str, dict]]) -> Callable[[FinishedRun], None]:
    def edit(run: FinishedRun) -> None:
        entries = _ledger_lines(run)
        kind, body = make_body(entries)
        entries.append({"kind": kind, "timestamp": entries[-1]["timestamp"], "body": body})
        _write_chained(run, entries)

    return edit


def _duplicate_round(entries: list[dict]) -> tuple[str, dict]:
    last_round = [e for e in entries if e["kind"] == "round"][-1]
    return "round", last_round["body"]


def _forged_round(entries: list[dict]) -> tuple[str, dict]:
    last_round = [e for e in entries if e["kind"] == "round"][-1]
    return "round", {**last_round["body"], "round": last_round["body"]["round"] + 1}


def _forged_key_destroyed(entries: list[dict]) -> tuple[str, dict]:
    return "key-destroyed", {"client": "0", "key_ids": [1], "destroyed_at": "2026-01-01T00:00:00.000+00:00"}


def _forged_key_destroyed_without_ids(entries: list[dict]) -> tuple[str, dict]:
    return "key-destroyed", {"client": "0", "destroyed_at": "2026-01-01T00:00:00.000+00:00"}


def _insert_forged_key_destroyed(run: FinishedRun) -> None:
    entries = _ledger_lines(run)
    entries.insert(3, {"kind": "key-destroyed", "timestamp": entries[3]["timestamp"], "body": _forged_key_destroyed(entries)[1]})
    _write_chained(run, entries)


def _truncate_ledger(lines: int, *, heads_too: bool = False) -> Callable[[FinishedRun], None]:
    def edit(run: FinishedRun) -> None:
        kept = run.files.ledger.read_text().splitlines(keepends=True)[:-lines]
        run.files.ledger.write_text("".join(kept))
        if heads_too:  # and every head that covered the cut entries: the state directory is self-consistent
            heads = run.files.ledger.with_name("ledger-heads.jsonl")
            keep = [h for h in heads.read_text().splitlines(keepends=True) if json.loads(h)["head"]["tree_size"] <= len(kept)]
            heads.write_text("".join(keep))

    return edit


def _edit_middle_entry(run: FinishedRun) -> None:
    text = run.files.ledger.read_text()
    run.files.ledger.write_text(text.replace('"num_examples":479', '"num_examples":480', 1))


def _replay_current_trajectory(*, drop_new_history: bool) -> Callable[[FinishedRun], None]:
    """Put back the current-trajectory row, MAC and all, from a copy of the index taken before the withdrawal."""

    def edit(run: FinishedRun) -> None:
        old = sqlite3.connect(run.before_withdrawal)
        row = old.execute("SELECT value, scope, mac FROM state WHERE key = 'current_trajectory'").fetchone()
        old.close()
        with _db(run) as conn:
            conn.execute("UPDATE state SET value = ?, scope = ?, mac = ? WHERE key = 'current_trajectory'", row)
            if drop_new_history:  # and make the index consistent with it again
                for table, column in (("trajectories", "id"), ("versions", "trajectory"), ("rounds", "trajectory"), ("updates", "trajectory")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} > 1")

    return edit


def _forged_head(run: FinishedRun) -> None:
    heads = run.files.ledger.with_name("ledger-heads.jsonl")
    last = json.loads(heads.read_text().splitlines()[-1])
    last["head"]["tree_size"] += 1
    heads.write_text(heads.read_text() + ledger_json(last) + "\n")


# --------------------------------------------------------------------------- the matrix

_UPDATE = "WHERE trajectory = {t} AND round = 1 AND client_id = '0'"
_UPDATE_ROW = "updates(trajectory=2, round=1, client_id='0')"
_COLUMN_EDITS: dict[str, tuple[str, str]] = {
    # table.column: (SQL, what the audit must name)
    "state.key": ("UPDATE state SET key = 'schema_versioN' WHERE key = 'schema_version'", "state(key='schema_versioN')"),
    "state.value": ("UPDATE state SET value = 1 WHERE key = 'current_trajectory'", "state(key='current_trajectory')"),
    "state.scope": ("UPDATE state SET scope = scope + 1 WHERE key = 'current_trajectory'", "state(key='current_trajectory')"),
    "state.mac": ("UPDATE state SET mac = zeroblob(32) WHERE key = 'schema_version'", "state(key='schema_version')"),
    "meta.key": ("UPDATE meta SET key = 'timelinE' WHERE key = 'timeline'", "meta(key='timelinE')"),
    "meta.value": ("UPDATE meta SET value = '[]' WHERE key = 'timeline'", "meta(key='timeline')"),
    "meta.mac": ("UPDATE meta SET mac = zeroblob(32) WHERE key = 'timeline'", "meta(key='timeline')"),
    "data_keys.key_id": ("UPDATE data_keys SET key_id = key_id + 1000 WHERE owner = '0'", "data_keys(key_id="),
    "data_keys.owner": ("UPDATE data_keys SET owner = '2' WHERE owner = '0'", "data_keys(key_id="),
    "data_keys.wrapped": ("UPDATE data_keys SET wrapped = zeroblob(60) WHERE owner = '0'", "data_keys(key_id="),
    "data_keys.created_at": ("UPDATE data_keys SET created_at = '2020-01-01' WHERE owner = '0'", "data_keys(key_id="),
    "data_keys.mac": ("UPDATE data_keys SET mac = zeroblob(32) WHERE owner = '0'", "data_keys(key_id="),
    "destroyed_keys.key_id": ("UPDATE destroyed_keys SET key_id = key_id + 1000 WHERE owner = '1'", "destroyed_keys(key_id="),
    "destroyed_keys.owner": ("UPDATE destroyed_keys SET owner = '2' WHERE owner = '1'", "destroyed_keys(key_id="),
    "destroyed_keys.destroyed_at": ("UPDATE destroyed_keys SET destroyed_at = '2020-01-01' WHERE owner = '1'", "destroyed_keys(key_id="),
    "destroyed_keys.mac": ("UPDATE destroyed_keys SET mac = zeroblob(32) WHERE owner = '1'", "destroyed_keys(key_id="),
    "blobs.blob_id": ("UPDATE blobs SET blob_id = 'ab' || substr(blob_id, 3) WHERE owner = '0' AND rowid = (SELECT MIN(rowid) FROM blobs WHERE owner = '0')", "blobs(blob_id='ab"),
    "blobs.owner": ("UPDATE blobs SET owner = '2' WHERE owner = '0'", "blobs(blob_id="),
    "blobs.key_id": ("UPDATE blobs SET key_id = key_id + 1 WHERE owner = '0'", "blobs(blob_id="),
    "blobs.kind": ("UPDATE blobs SET kind = 'model' WHERE owner = '0'", "blobs(blob_id="),
    "blobs.float_dtype": ("UPDATE blobs SET float_dtype = 'float16' WHERE owner = '0'", "blobs(blob_id="),
    "blobs.size": ("UPDATE blobs SET size = size + 1 WHERE owner = '0'", "blobs(blob_id="),
    "blobs.created_at": ("UPDATE blobs SET created_at = '2020-01-01' WHERE owner = '0'", "blobs(blob_id="),
    "blobs.mac": ("UPDATE blobs SET mac = zeroblob(32) WHERE owner = '0'", "blobs(blob_id="),
    "trajectories.id": ("UPDATE trajectories SET id = 7 WHERE id = 2", "trajectories(id=7)"),
    "trajectories.parent": ("UPDATE trajectories SET parent = NULL WHERE id = 2", "trajectories(id=2)"),
    "trajectories.base_version": ("UPDATE trajectories SET base_version = 1 WHERE id = 2", "trajectories(id=2)"),
    "trajectories.status": ("UPDATE trajectories SET status = 'open' WHERE id = 2", "trajectories(id=2)"),
    "trajectories.info": ("UPDATE trajectories SET info = '{{}}' WHERE id = 2", "trajectories(id=2)"),
    "trajectories.created_at": ("UPDATE trajectories SET created_at = '2020' WHERE id = 2", "trajectories(id=2)"),
    "trajectories.mac": ("UPDATE trajectories SET mac = zeroblob(32) WHERE id = 2", "trajectories(id=2)"),
    "versions.trajectory": ("UPDATE versions SET trajectory = 9 WHERE trajectory = {t} AND version = 3", "versions(trajectory=9, version=3)"),
    "versions.version": ("UPDATE versions SET version = 9 WHERE trajectory = {t} AND version = 3", "versions(trajectory=2, version=9)"),
    "versions.blob_id": (
        "UPDATE versions SET blob_id = (SELECT blob_id FROM versions WHERE trajectory = {t} AND version = 2) "
        "WHERE trajectory = {t} AND version = 3",
        "versions(trajectory=2, version=3)",
    ),
    "versions.mac": ("UPDATE versions SET mac = zeroblob(32) WHERE trajectory = {t} AND version = 3", "versions(trajectory=2, version=3)"),
    "rounds.trajectory": ("UPDATE rounds SET trajectory = 9 WHERE trajectory = {t} AND round = 3", "rounds(trajectory=9, round=3)"),
    "rounds.round": ("UPDATE rounds SET round = 9 WHERE trajectory = {t} AND round = 3", "rounds(trajectory=2, round=9)"),
    "rounds.participants": ("UPDATE rounds SET participants = '[\"0\"]' WHERE trajectory = {t} AND round = 3", "rounds(trajectory=2, round=3)"),
    "rounds.metrics": ("UPDATE rounds SET metrics = '{{}}' WHERE trajectory = {t} AND round = 1", "rounds(trajectory=2, round=1)"),
    "rounds.completed_at": ("UPDATE rounds SET completed_at = '2020' WHERE trajectory = {t} AND round = 1", "rounds(trajectory=2, round=1)"),
    "rounds.mac": ("UPDATE rounds SET mac = zeroblob(32) WHERE trajectory = {t} AND round = 1", "rounds(trajectory=2, round=1)"),
    "updates.trajectory": (f"UPDATE updates SET trajectory = 9 {_UPDATE}", "updates(trajectory=9, round=1, client_id='0')"),
    "updates.round": (f"UPDATE updates SET round = 9 {_UPDATE}", "updates(trajectory=2, round=9, client_id='0')"),
    "updates.client_id": (f"UPDATE updates SET client_id = '7' {_UPDATE}", "updates(trajectory=2, round=1, client_id='7')"),
    "updates.num_examples": (f"UPDATE updates SET num_examples = num_examples + 1 {_UPDATE}", "num_examples is"),
    "updates.weight": (f"UPDATE updates SET weight = 0.9 {_UPDATE}", "weight is 0.9 in the index"),
    "updates.blob_id": (
        "UPDATE updates SET blob_id = (SELECT blob_id FROM updates WHERE trajectory = {t} AND round = 1 AND client_id = '2') "
        + _UPDATE,
        "points to blob",
    ),
    "updates.update_hash": (f"UPDATE updates SET update_hash = '{'0' * 64}' {_UPDATE}", "update_hash is 0000000000000000"),
    "updates.recorded_at": (f"UPDATE updates SET recorded_at = '2020' {_UPDATE}", _UPDATE_ROW),
    "updates.mac": (f"UPDATE updates SET mac = zeroblob(32) {_UPDATE}", _UPDATE_ROW),
}

CASES: dict[str, tuple[Callable[[FinishedRun], None], str]] = {
    # blob faults
    "blob: a byte flipped in a client's update": (_flip_byte(lambda r: _update_blob(r, 1, "0")), "failed authentication"),
    "blob: update truncated": (
        lambda r: _update_blob(r, 1, "0").write_bytes(_update_blob(r, 1, "0").read_bytes()[:-10]),
        "failed authentication",
    ),
    "blob: update deleted": (lambda r: _update_blob(r, 1, "0").unlink(), "is missing"),
    "blob: update swapped with another round's": (
        lambda r: _update_blob(r, 1, "0").write_bytes(_update_blob(r, 2, "0").read_bytes()),
        "failed authentication",
    ),
    "blob: update overwritten with another client's": (
        lambda r: _update_blob(r, 1, "0").write_bytes(_update_blob(r, 1, "2").read_bytes()),
        "failed authentication",
    ),
    "blob: a byte flipped in a global model": (_flip_byte(lambda r: _model_blob(r, 3)), "failed authentication"),
    "blob: global model deleted": (lambda r: _model_blob(r, 2).unlink(), "is missing"),
    # index rows
    **{f"index: {name}": (_sql(sql), named) for name, (sql, named) in _COLUMN_EDITS.items()},
    "index: an update row deleted": (_sql(f"DELETE FROM updates {_UPDATE}"), "the index has update rows for clients ['2']"),
    "index: a meta row deleted": (_sql("DELETE FROM meta WHERE key = 'timeline'"), "row 'timeline' was deleted"),
    "index: the list of meta keys edited": (
        _sql("UPDATE state SET value = '[]' WHERE key = 'meta_keys'"), "state(key='meta_keys')"
    ),
    "index: current trajectory row replayed from a copy made before the withdrawal": (
        _replay_current_trajectory(drop_new_history=False),
        "was written when the store had 1 trajectories, but it has 2",
    ),
    "index: history rolled back to before the withdrawal (old row replayed, new trajectory deleted)": (
        _replay_current_trajectory(drop_new_history=True),
        "current trajectory: is 1, but ledger entry 4 (the last unlearning) continued in trajectory 2",
    ),
    # ledger faults
    "ledger: a middle entry deleted and the rest re-chained": (_delete_and_rechain(2), "no longer hash to the signed Merkle root"),
    "ledger: a forged round appended": (_append_forged(_forged_round), "not covered by any tree head"),
    "ledger: a duplicate round entry appended": (_append_forged(_duplicate_round), "records round 3 of trajectory 2 again"),
    "ledger: a forged key-destroyed entry for a live key": (
        _append_forged(_forged_key_destroyed),
        "says data key 1 of client '0' was destroyed, but the store still holds it",
    ),
    "ledger: a forged key-destroyed entry naming no key, for a client whose key exists": (
        _append_forged(_forged_key_destroyed_without_ids),
        "says client '0''s key was destroyed, but the store still holds a key of that client",
    ),
    "ledger: a forged key-destroyed entry inserted mid-ledger, re-chained": (
        _insert_forged_key_destroyed,
        "no longer hash to the signed Merkle root",
    ),
    "ledger: tail truncated": (_truncate_ledger(2), "were removed from its end"),
    "ledger: tail and the heads covering it truncated": (
        _truncate_ledger(2, heads_too=True),
        "the ledger was truncated after it was issued",
    ),
    "ledger: an entry edited in place": (_edit_middle_entry, "hash mismatch"),
    "ledger: a head forged without the key": (_forged_head, "does not verify under the federation key"),
}


def test_the_matrix_has_at_least_30_distinct_edits() -> None:
    assert len(CASES) >= 30


def test_an_untouched_run_passes_and_the_audit_changes_no_byte(finished: FinishedRun, tmp_path: Path) -> None:
    run = finished.copy(tmp_path)
    before = _digests(run.state)
    code, output = _audit(run)
    assert code == 0, output
    assert output.startswith("OK: ") and "agrees with the ledger" in output
    assert _digests(run.state) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_edit_is_detected_and_named(finished: FinishedRun, tmp_path: Path, case: str) -> None:
    run = finished.copy(tmp_path)
    edit, named = CASES[case]
    edit(run)
    before = _digests(run.state)
    code, output = _audit(run)
    assert code == 1, f"{case}: audit said {output}"
    assert named in output, f"{case}: the audit did not name it ({named!r}): {output}"
    assert _digests(run.state) == before  # the audit changed nothing, not even on tampered data


def test_the_audit_runs_on_a_read_only_mount_and_changes_nothing(finished: FinishedRun, tmp_path: Path) -> None:
    run = finished.copy(tmp_path / "source")
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to make a read-only bind mount")
    subprocess.run(["mount", "--bind", str(run.state), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
        with pytest.raises(OSError):
            (mount / "probe").write_text("x")  # it is read-only indeed
        before = _digests(mount)
        mounted = FinishedRun(mount, run.held)
        code, output = _audit(mounted)
        assert code == 0, output
        assert _digests(mount) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _digests(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under ``root`` (a file created or deleted shows too)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
