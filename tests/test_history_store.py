"""Tests of the durable, encrypted, streaming history store (server/store/history_store.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedforget.server.store.blob_codec import ModelSpec, decode_arrays, encode_arrays
from fedforget.server.store.errors import (
    BlobCorruptError,
    FederationMismatchError,
    FedforgetError,
    KeyDestroyedError,
    KeyFileError,
    MissingModelError,
    MissingUpdateError,
    ModelMismatchError,
    RoundOrderError,
    RowAuthenticationError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from fedforget.server.store.history_store import HistoryStore, StoreStats, TrajectoryInfo, UpdateInfo

CONV_SHAPES = {  # a small LeNet-style conv net, ~40k parameters
    "conv1.weight": (16, 1, 5, 5),
    "conv1.bias": (16,),
    "conv2.weight": (32, 16, 5, 5),
    "conv2.bias": (32,),
    "fc1.weight": (64, 400),
    "fc1.bias": (64,),
    "fc2.weight": (10, 64),
    "fc2.bias": (10,),
}


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "mask": rng.integers(0, 2, size=(5,)).astype(bool),
        "fc.weight": rng.standard_normal((3, 36)).astype(np.float32),
    }


def delta(seed: int, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for k, v in small_model().items():
        if v.dtype.kind == "f":
            out[k] = (rng.standard_normal(v.shape) * scale).astype(np.float32)
        else:
            out[k] = np.full(v.shape, seed % 2, dtype=v.dtype)
    return out


def assert_arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


SPEC = ModelSpec.from_arrays(small_model())


def make_store(tmp_path: Path, name: str = "store", **kw: object) -> HistoryStore:
    kw.setdefault("federation_id", "fed-A")
    kw.setdefault("model_spec", SPEC)
    return HistoryStore.create(tmp_path / name, **kw)  # type: ignore[arg-type]


def run_rounds(
    store: HistoryStore, first: int, last: int, clients: list[str], *, model_seed_base: int = 0
) -> None:
    for r in range(first, last + 1):
        for i, c in enumerate(clients):
            store.record_update(r, c, delta(r * 100 + i), num_examples=10 + i, weight=float(10 + i))
        store.commit_round(r, small_model(model_seed_base + r), {"loss": 1.0 / r})


def blob_files(store_path: Path) -> list[Path]:
    return sorted((store_path / "blobs").glob("*.ffb"))


def update_blob_path(store: HistoryStore, round: int, client: str, trajectory: int | None = None) -> Path:
    conn = sqlite3.connect(store.path / "index.sqlite")
    traj = trajectory if trajectory is not None else store.current_trajectory()
    (blob_id,) = conn.execute(
        "SELECT blob_id FROM updates WHERE trajectory=? AND round=? AND client_id=?", (traj, round, client)
    ).fetchone()
    conn.close()
    return store.path / "blobs" / f"{blob_id}.ffb"


# --------------------------------------------------------------------------- errors / spec


def test_error_hierarchy() -> None:
    for exc in (
        StoreExistsError, StoreNotFoundError, KeyFileError, BlobCorruptError, KeyDestroyedError,
        FederationMismatchError, ModelMismatchError, MissingUpdateError,
    ):
        assert issubclass(exc, StoreError) and issubclass(exc, FedforgetError)
    assert issubclass(RoundOrderError, ValueError)


def test_model_spec_json_nbytes_and_check() -> None:
    spec = ModelSpec.from_arrays(small_model())
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.nbytes == 4 * (72 + 4 + 108) + 8 + 5
    m = small_model()
    spec.check(m, "model")
    m16 = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in m.items()}
    spec.check(m16, "fp16 model")  # floating dtypes are interchangeable
    bad = dict(m, **{"fc.weight": np.zeros((3, 35), np.float32)})
    with pytest.raises(ModelMismatchError, match=r"'fc.weight'.*\(3, 35\).*\(3, 36\)"):
        spec.check(bad, "update of client 'x'")
    missing = {k: v for k, v in m.items() if k != "conv.bias"}
    with pytest.raises(ModelMismatchError, match="lacks array 'conv.bias'"):
        spec.check(missing, "model")
    with pytest.raises(ModelMismatchError, match="'extra'"):
        spec.check(dict(m, extra=np.zeros(1)), "model")
    with pytest.raises(ModelMismatchError, match="dtype int32"):
        spec.check(dict(m, **{"bn.num_batches_tracked": np.array(1, np.int32)}), "model")


# --------------------------------------------------------------------------- create / open


def test_create_layout_and_key_file_mode(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.close()
    root = tmp_path / "store"
    key = root / "federation.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.stat().st_size == 32
    doc = json.loads((root / "store.json").read_text())
    assert doc["federation_id"] == "fed-A"
    assert ModelSpec.from_json(doc["model_spec"]) == SPEC
    assert doc["options"]["retention_interval"] == 1
    assert (root / "index.sqlite").exists() and (root / "blobs").is_dir()
    with HistoryStore.open(root) as s:
        assert (s.federation_id, s.model_spec, s.retention_interval, s.update_dtype) == ("fed-A", SPEC, 1, "float32")
        assert s.last_completed_round() == 0


def test_create_refuses_existing_store_nonempty_dir_and_unwritable(tmp_path: Path) -> None:
    make_store(tmp_path, key_file=tmp_path / "outside.key").close()
    store = make_store(tmp_path)  # the first recorded no round (a run that failed before round 1): replaced
    assert not (tmp_path / "outside.key").exists()
    store.write_initial_model(small_model(0))
    run_rounds(store, 1, 1, ["a"])
    store.close()
    with pytest.raises(StoreExistsError, match="already holds a history store"):
        make_store(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="non-empty"):
        make_store(tmp_path, "junk")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StoreError, match=str(tmp_path / "a_file")):
        make_store(tmp_path, "a_file/sub")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(StoreError, match=str(ro)):
                make_store(tmp_path, "ro/store")
            with pytest.raises(StoreError, match=str(ro)):
                make_store(tmp_path, "ro")
        finally:
            ro.chmod(0o700)


def test_failed_create_cleans_up(tmp_path: Path) -> None:
    key = tmp_path / "taken.key"
    key.write_bytes(b"k" * 32)
    with pytest.raises(KeyFileError, match="already exists"):
        make_store(tmp_path, key_file=key)
    assert key.read_bytes() == b"k" * 32  # never overwritten
    assert not (tmp_path / "store").exists()
    make_store(tmp_path).close()  # a retry works


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=str(tmp_path / "nope")):
        HistoryStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="store.json"):
        HistoryStore.open(tmp_path / "empty")


def test_second_open_is_refused_while_first_is_open(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(StoreLockedError, match="already open"):
        HistoryStore.open(tmp_path / "store")
    store.close()
    HistoryStore.open(tmp_path / "store").close()
    with pytest.raises(StoreError, match="closed"):
        store.last_completed_round()


def test_check_compatible(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.check_compatible(federation_id="fed-A", model_spec=SPEC)
        with pytest.raises(FederationMismatchError, match=r"'fed-A'.*'fed-B'"):
            store.check_compatible(federation_id="fed-B", model_spec=SPEC)
        other = ModelSpec.from_arrays(dict(small_model(), **{"fc.weight": np.zeros((3, 40), np.float32)}))
        with pytest.raises(ModelMismatchError, match=r"'fc.weight'.*\(3, 40\).*\(3, 36\)"):
            store.check_compatible(federation_id="fed-A", model_spec=other)


# --------------------------------------------------------------------------- round trips


def test_roundtrip_fp32_exact_and_int_exact(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        assert not store.has_model(0)
        store.write_initial_model(small_model(0))
        assert store.has_model(0) and not store.has_model(1)
        run_rounds(store, 1, 3, ["c1", "c2"])
        assert store.last_completed_round() == 3 and store.has_model(3)
    with HistoryStore.open(tmp_path / "store") as store:
        assert_arrays_equal(store.read_model(0), small_model(0))
        reader = store.reader()
        rounds = list(reader.rounds())
        assert [rv.round for rv in rounds] == [1, 2, 3]
        for rv in rounds:
            assert rv.metrics == {"loss": pytest.approx(1.0 / rv.round)}
            assert [p.client_id for p in rv.participants] == ["c1", "c2"]
            assert rv.participants[1] == UpdateInfo(rv.round, "c2", 11, 11.0, True)
            assert_arrays_equal(rv.model_before(), small_model(rv.round - 1))
            assert_arrays_equal(rv.model_after(), small_model(rv.round))
            for i, (info, upd) in enumerate(rv.updates()):
                assert_arrays_equal(upd, delta(rv.round * 100 + i))
                assert upd["conv.weight"].dtype == np.float32
                assert upd["bn.num_batches_tracked"].dtype == np.int64
                assert upd["mask"].dtype == np.bool_
        assert [rv.round for rv in reader.rounds(2, 3)] == [2, 3]
        assert reader.clients() == ["c1", "c2"]
        assert reader.first_participation("c2") == 1
        assert reader.first_participation("zz") is None
        with pytest.raises(MissingModelError, match="version 9"):
            reader.model(9)


def test_roundtrip_fp16_updates(tmp_path: Path) -> None:
    with make_store(tmp_path, update_dtype="float16") as store:
        store.write_initial_model(small_model(0))
        big = delta(7, scale=1.0)
        big["fc.weight"][0, 0] = 1e6  # beyond float16: this blob must fall back to float32, not inf
        store.record_update(1, "c1", delta(1), num_examples=1, weight=1.0)
        store.record_update(1, "c2", big, num_examples=1, weight=1.0)
        store.commit_round(1, small_model(1))
    with HistoryStore.open(tmp_path / "store") as store:
        rv = next(store.reader().rounds())
        assert_arrays_equal(rv.model_after(), small_model(1))  # models are always exact fp32
        got = rv.update("c1")
        for k, v in delta(1).items():
            assert got[k].dtype == (np.float32 if v.dtype.kind == "f" else v.dtype)
            np.testing.assert_allclose(got[k], v, rtol=1e-3, atol=1e-7)
        assert_arrays_equal(rv.update("c2"), big)


def test_codec_rejects_wrong_spec_and_trailing_bytes() -> None:
    payload, used = encode_arrays(small_model(), SPEC)
    assert used == "float32"
    assert_arrays_equal(decode_arrays(payload, SPEC), small_model())
    other = ModelSpec.from_arrays({"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="different model spec"):
        decode_arrays(payload, other)
    with pytest.raises(ValueError, match="unexpected bytes"):
        decode_arrays(payload + b"\0", SPEC)
    with pytest.raises(ValueError):
        decode_arrays(payload[:-3], SPEC)


# --------------------------------------------------------------------------- retention


def test_retention_interval(tmp_path: Path) -> None:
    with make_store(tmp_path, retention_interval=3) as store:
        assert [r for r in range(1, 11) if store.is_retained(r)] == [1, 4, 7, 10]
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 7, ["a", "b"])
        reader = store.reader()
        for rv in reader.rounds():
            assert [p.client_id for p in rv.participants] == ["a", "b"]  # metadata always
            retained = store.is_retained(rv.round)
            assert all(p.retained == retained for p in rv.participants)
            got = [info.client_id for info, _ in rv.updates()]
            assert got == (["a", "b"] if retained else [])
            if not retained:
                with pytest.raises(MissingUpdateError, match=rf"round {rv.round} was not retained"):
                    rv.update("a")
        rv1 = next(reader.rounds(1, 1))
        with pytest.raises(MissingUpdateError, match="did not take part"):
            rv1.update("zz")
        st = store.stats()
        assert (st.rounds, st.client_rounds, st.retained_updates, st.update_blobs) == (7, 14, 6, 6)
        assert len(blob_files(store.path)) == 8 + 6  # versions 0..7 + retained updates


# --------------------------------------------------------------------------- streaming


def test_streaming_pass_holds_one_model_and_one_update(tmp_path: Path) -> None:
    side = 512  # 512 x 512 float32 = 1 MiB model
    model_nbytes = side * side * 4
    spec = ModelSpec.from_arrays({"w": np.zeros((side, side), np.float32)})
    rng = np.random.default_rng(0)
    base = rng.standard_normal((side, side)).astype(np.float32)
    n_rounds, n_clients = 30, 5
    with HistoryStore.create(tmp_path / "big", federation_id="f", model_spec=spec) as store:
        store.write_initial_model({"w": base})
        for r in range(1, n_rounds + 1):
            for c in range(n_clients):
                store.record_update(r, f"c{c}", {"w": base * np.float32(1e-3 * (c + 1))}, num_examples=1, weight=1.0)
            store.commit_round(r, {"w": base + np.float32(r)})
        del base
        reader = store.reader()
        tracemalloc.start()
        try:
            seen = 0
            checksum = 0.0
            for rv in reader.rounds():
                before = rv.model_before()
                for info, upd in rv.updates():
                    checksum += float(upd["w"][0, 0]) + float(before["w"][0, 0])
                    seen += 1
                del before
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert seen == n_rounds * n_clients
    assert np.isfinite(checksum)
    total = (n_rounds * (n_clients + 1)) * model_nbytes
    # Held at the peak: `before`, the previous `upd` (the loop variable keeps it while the
    # next one decodes) and one blob being decoded (plaintext ~0.86 MiB + its arrays 1 MiB
    # + a zlib buffer): ~4.4 MiB measured, never the ~180 MiB history.
    assert peak < 5.5 * model_nbytes, (peak, total)


# --------------------------------------------------------------------------- crash safety


def test_index_failure_at_commit_leaves_no_orphan_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        store.record_update(1, "c1", delta(1), num_examples=1, weight=0.5)
        store.record_update(1, "c2", delta(2), num_examples=1, weight=0.5)
        n_files = len(blob_files(store.path))

        def boom(*a: object, **k: object) -> None:
            raise sqlite3.OperationalError("disk I/O error (simulated)")

        monkeypatch.setattr(store, "_insert_blob_row", boom)
        with pytest.raises(StoreError, match="disk I/O error"):
            store.commit_round(1, small_model(1))
        monkeypatch.undo()
        assert len(blob_files(store.path)) == n_files  # the model blob of the failed commit is gone
        assert store.last_completed_round() == 0
        store.commit_round(1, small_model(1))
        rv = next(store.reader().rounds())
        assert [p.client_id for p in rv.participants] == ["c1", "c2"]
        assert_arrays_equal(rv.update("c2"), delta(2))


def test_crash_between_blob_and_index_then_reopen(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 2, ["c1", "c2"])
        referenced = set(blob_files(store.path))
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from pathlib import Path
        from fedforget.server.store.history_store import HistoryStore
        def die(*a, **k):
            os._exit(17)  # hard crash: no cleanup, no rollback handlers
        s = HistoryStore.open(Path({str(tmp_path / 'store')!r}))
        u = {{k: np.asarray(v) for k, v in np.load({str(tmp_path / 'u.npz')!r}).items()}}
        s.record_update(3, "c1", u, num_examples=1, weight=0.5)
        s.record_update(3, "c2", u, num_examples=1, weight=0.5)
        s._insert_blob_row = die  # every blob file of round 3 is durable; the index is not written
        s.commit_round(3, s.read_model(2))
        """
    )
    np.savez(tmp_path / "u.npz", **delta(3))  # type: ignore[arg-type]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    after_crash = set(blob_files(tmp_path / "store"))
    assert len(after_crash - referenced) == 3  # round 3's two updates and model: orphans
    with HistoryStore.open(tmp_path / "store") as store:
        assert store.last_completed_round() == 2
        assert [rv.round for rv in store.reader().rounds()] == [1, 2]
        for rv in store.reader().rounds():
            for i, (_, upd) in enumerate(rv.updates()):
                assert_arrays_equal(upd, delta(rv.round * 100 + i))
        assert set(blob_files(store.path)) == referenced  # orphan and discarded blob removed
        st = store.stats()
        assert st.bytes == sum(p.stat().st_size for p in referenced)
        assert (st.rounds, st.client_rounds) == (2, 4)
        run_rounds(store, 3, 3, ["c2"])  # the round can be re-run
        assert [p.client_id for p in next(store.reader().rounds(3)).participants] == ["c2"]


def test_orphan_blob_file_is_ignored_and_removed(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 1, ["c1"])
        bytes_before = store.stats().bytes
        src = blob_files(store.path)[0]
    orphan = tmp_path / "store" / "blobs" / ("ab" * 16 + ".ffb")
    orphan.write_bytes(src.read_bytes())
    (tmp_path / "store" / "blobs" / ".tmp-half-written.ffb").write_bytes(b"xx")
    with HistoryStore.open(tmp_path / "store") as store:
        assert not orphan.exists()
        assert store.stats().bytes == bytes_before
        assert_arrays_equal(store.read_model(1), small_model(1))


def test_uncommitted_round_discarded_on_reopen(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 1, ["c1", "c2"])
        n_files = len(blob_files(store.path))
        store.record_update(2, "c1", delta(5), num_examples=1, weight=1.0)
        store.record_update(2, "c3", delta(6), num_examples=1, weight=1.0)
        assert [rv.round for rv in store.reader().rounds()] == [1]  # not visible before commit
        assert store.reader().first_participation("c3") is None
    with HistoryStore.open(tmp_path / "store") as store:
        assert store.last_completed_round() == 1
        assert len(blob_files(store.path)) == n_files
        assert store.stats().client_rounds == 2
        store.record_update(2, "c2", delta(7), num_examples=1, weight=1.0)
        store.commit_round(2, small_model(2))
        rv = next(store.reader().rounds(2))
        assert [p.client_id for p in rv.participants] == ["c2"]
        assert_arrays_equal(rv.update("c2"), delta(7))


def test_rerecord_replaces_and_discard_uncommitted(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        store.record_update(1, "c1", delta(1), num_examples=1, weight=1.0)
        n_files = len(blob_files(store.path))
        store.record_update(1, "c1", delta(2), num_examples=5, weight=2.0)
        assert len(blob_files(store.path)) == n_files  # the replaced blob is deleted
        store.record_update(1, "c2", delta(3), num_examples=1, weight=1.0)
        assert store.discard_uncommitted() == 2
        store.record_update(1, "c1", delta(4), num_examples=6, weight=3.0)
        store.commit_round(1, small_model(1))
        rv = next(store.reader().rounds())
        assert rv.participants == [UpdateInfo(1, "c1", 6, 3.0, True)]
        assert_arrays_equal(rv.update("c1"), delta(4))


def test_round_order_is_enforced(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        with pytest.raises(RoundOrderError, match="write_initial_model"):
            store.record_update(1, "c1", delta(1), num_examples=1, weight=1.0)
        store.write_initial_model(small_model(0))
        with pytest.raises(RoundOrderError, match="already has its initial model"):
            store.write_initial_model(small_model(0))
        with pytest.raises(ValueError, match="next round is 1"):
            store.commit_round(2, small_model(2))
        store.commit_round(1, small_model(1))
        with pytest.raises(ValueError, match="next round is 2"):
            store.commit_round(1, small_model(1))
        with pytest.raises(ValueError, match="next round is 2"):
            store.record_update(1, "c1", delta(1), num_examples=1, weight=1.0)
        with pytest.raises(ModelMismatchError, match="'fc.weight'"):
            store.commit_round(2, dict(small_model(2), **{"fc.weight": np.zeros(3, np.float32)}))
        with pytest.raises(ValueError, match="weight"):
            store.record_update(2, "c1", delta(1), num_examples=1, weight=float("nan"))
        assert store.last_completed_round() == 1


# --------------------------------------------------------------------------- tampering and keys


@pytest.fixture()
def two_round_store(tmp_path: Path) -> Path:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 2, ["c1", "c2"])
    return tmp_path / "store"


def _first_update(path: Path, round: int, client: str) -> None:
    with HistoryStore.open(path) as store:
        next(store.reader().rounds(round, round)).update(client)


def test_tampered_blob_is_detected(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        target = update_blob_path(store, 1, "c2")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BlobCorruptError, match=rf"{target}.*client 'c2' in round 1"):
        _first_update(two_round_store, 1, "c2")
    _first_update(two_round_store, 1, "c1")  # others still read


def test_tampered_header_is_detected(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        target = update_blob_path(store, 2, "c1")
    data = bytearray(target.read_bytes())
    data[10] ^= 0x80  # inside the nonce
    target.write_bytes(bytes(data))
    with pytest.raises(BlobCorruptError, match=rf"{target}.*client 'c1' in round 2"):
        _first_update(two_round_store, 2, "c1")


def test_truncated_blob_is_detected(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        target = update_blob_path(store, 2, "c2")
    data = target.read_bytes()
    target.write_bytes(data[:-7])
    with pytest.raises(BlobCorruptError, match=rf"{target}.*client 'c2' in round 2"):
        _first_update(two_round_store, 2, "c2")
    target.write_bytes(data[:5])
    with pytest.raises(BlobCorruptError, match=str(target)):
        _first_update(two_round_store, 2, "c2")


def test_swapped_blob_is_detected(two_round_store: Path) -> None:
    # same owner, same data key: only the blob id in the associated data tells them apart
    with HistoryStore.open(two_round_store) as store:
        r1 = update_blob_path(store, 1, "c1")
        r2 = update_blob_path(store, 2, "c1")
    r1.write_bytes(r2.read_bytes())
    with pytest.raises(BlobCorruptError, match=rf"{r1}.*client 'c1' in round 1"):
        _first_update(two_round_store, 1, "c1")


def test_swapped_model_blob_and_missing_blob(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        conn = sqlite3.connect(two_round_store / "index.sqlite")
        ids = dict(conn.execute("SELECT version, blob_id FROM versions WHERE trajectory = 1"))
        conn.close()
        v1 = two_round_store / "blobs" / f"{ids[1]}.ffb"
        v2 = two_round_store / "blobs" / f"{ids[2]}.ffb"
        v1.write_bytes(v2.read_bytes())
        with pytest.raises(BlobCorruptError, match=rf"{v1}.*version 1"):
            store.read_model(1)
        v2.unlink()
        with pytest.raises(BlobCorruptError, match=rf"{v2}.*missing"):
            store.read_model(2)
        assert_arrays_equal(store.read_model(0), small_model(0))


def test_wrong_key_file(tmp_path: Path, two_round_store: Path) -> None:
    make_store(tmp_path, "other").close()
    with pytest.raises(KeyFileError, match="does not open this store"):
        HistoryStore.open(two_round_store, key_file=tmp_path / "other" / "federation.key")
    bad = tmp_path / "short.key"
    bad.write_bytes(b"123")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match=str(bad)):
        HistoryStore.open(two_round_store, key_file=bad)
    HistoryStore.open(two_round_store).close()  # the lock was released by the failed opens


def test_missing_key_file(two_round_store: Path) -> None:
    key = two_round_store / "federation.key"
    key.rename(two_round_store.parent / "moved.key")
    with pytest.raises(KeyFileError, match=rf"{key} not found.*key_file="):
        HistoryStore.open(two_round_store)
    with HistoryStore.open(two_round_store, key_file=two_round_store.parent / "moved.key") as store:
        assert store.last_completed_round() == 2


def test_custom_key_file_location(tmp_path: Path) -> None:
    key = tmp_path / "secrets" / "fed.key"
    key.parent.mkdir()
    with make_store(tmp_path, key_file=key) as store:
        store.write_initial_model(small_model(0))
    assert not (tmp_path / "store" / "federation.key").exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with HistoryStore.open(tmp_path / "store") as store:  # location recorded in store.json
        assert_arrays_equal(store.read_model(0), small_model(0))


def test_destroy_client_key(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        conn = sqlite3.connect(two_round_store / "index.sqlite")
        (wrapped,) = conn.execute("SELECT wrapped FROM data_keys WHERE owner = 'c1'").fetchone()
        conn.close()
        store.destroy_client_key("c1")
        store.destroy_client_key("c1")  # idempotent
        store.destroy_client_key("never-seen")
        rv = next(store.reader().rounds(1, 1))
        with pytest.raises(KeyDestroyedError, match=r"client 'c1'.*round 1"):
            rv.update("c1")
        assert_arrays_equal(rv.update("c2"), delta(101))
        assert_arrays_equal(rv.model_after(), small_model(1))
        assert [p.client_id for p in rv.participants] == ["c1", "c2"]  # metadata stays
        with pytest.raises(ValueError):
            store.destroy_client_key("__global__")
    raw = b"".join(p.read_bytes() for p in two_round_store.glob("index.sqlite*"))
    assert wrapped not in raw  # the wrapped key is gone from the index files, not just unlinked
    with HistoryStore.open(two_round_store) as store:
        with pytest.raises(KeyDestroyedError, match="'c1'"):
            next(store.reader().rounds(2, 2)).update("c1")
        # a client that comes back later gets a fresh key
        store.record_update(3, "c1", delta(9), num_examples=1, weight=1.0)
        store.commit_round(3, small_model(3))
        assert_arrays_equal(next(store.reader().rounds(3)).update("c1"), delta(9))


# --------------------------------------------------------------------------- size


def test_fp16_update_blob_is_at_most_half_the_fp32_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in CONV_SHAPES.items()}
    spec = ModelSpec.from_arrays(model)
    assert 38_000 < spec.num_params < 42_000
    with HistoryStore.create(tmp_path / "s", federation_id="f", model_spec=spec, update_dtype="float16") as store:
        store.write_initial_model(model)
        t0 = time.perf_counter()
        for c in range(5):
            # realistic local-training deltas: small, per-layer scale
            upd = {k: (rng.standard_normal(v.shape) * 1e-3 * (1 + 0.5 * i)).astype(np.float32)
                   for i, (k, v) in enumerate(model.items())}
            store.record_update(1, f"c{c}", upd, num_examples=1, weight=1.0)
        elapsed = (time.perf_counter() - t0) / 5
        store.commit_round(1, model)
        sizes = [update_blob_path(store, 1, f"c{c}").stat().st_size for c in range(5)]
        assert store.stats().update_bytes == sum(sizes)
    assert max(sizes) <= 0.5 * spec.nbytes, (sizes, spec.nbytes)
    assert elapsed < 0.5  # generous: includes fsyncs on slow disks


# --------------------------------------------------------------------------- trajectories


def test_fork_and_trajectories(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 4, ["a", "b", "c"])
        files_before = len(blob_files(store.path))
        bytes_before = store.stats().bytes
        assert store.reader().first_participation("b") == 1

        t2 = store.fork(base_version=1, info={"forget": "b"})
        assert t2 == 2 and store.current_trajectory() == 2
        assert store.last_completed_round() == 1
        assert len(blob_files(store.path)) == files_before  # shared, not copied
        assert store.stats().bytes == bytes_before
        assert [rv.round for rv in store.reader().rounds()] == [1]
        assert_arrays_equal(store.read_model(1), small_model(1))
        with pytest.raises(MissingModelError):
            store.read_model(2)
        run_rounds(store, 2, 3, ["a", "c"], model_seed_base=50)
        r2 = store.reader(2)
        assert [rv.round for rv in r2.rounds()] == [1, 2, 3]
        assert r2.clients() == ["a", "b", "c"]  # b took part in the shared round 1
        assert [p.client_id for p in next(r2.rounds(2)).participants] == ["a", "c"]
        assert_arrays_equal(r2.model(3), small_model(53))
        r1 = store.reader(1)
        assert [rv.round for rv in r1.rounds()] == [1, 2, 3, 4]
        assert_arrays_equal(r1.model(3), small_model(3))

        store.set_trajectory_status(2, "done", {"rounds": 2})
        infos = store.trajectories()
        assert infos[0] == TrajectoryInfo(1, None, 0, "open", {}, infos[0].created_at)
        assert (infos[1].id, infos[1].parent, infos[1].base_version, infos[1].status) == (2, 1, 1, "done")
        assert infos[1].info == {"forget": "b", "rounds": 2}
        assert store.trajectory_info(2) == infos[1]
        with pytest.raises(StoreError, match=r"no trajectory 7 \(it has \[1, 2\]\)"):
            store.trajectory_info(7)

        with pytest.raises(RoundOrderError):
            store.fork(base_version=9, info={})
        store.record_update(4, "a", delta(1), num_examples=1, weight=1.0)
        with pytest.raises(RoundOrderError, match="round 4"):
            store.fork(base_version=0, info={})
        with pytest.raises(RoundOrderError, match="round 4"):
            store.switch_trajectory(1)
        store.discard_uncommitted()
        store.switch_trajectory(1)
        assert store.last_completed_round() == 4
        with pytest.raises(StoreError, match="no trajectory 7"):
            store.switch_trajectory(7)
        t3 = store.fork(base_version=0, info={})
        assert store.last_completed_round() == 0
        assert_arrays_equal(store.read_model(0), small_model(0))
        store.switch_trajectory(2)
    with HistoryStore.open(tmp_path / "store") as store:
        assert store.current_trajectory() == 2
        assert [t.id for t in store.trajectories()] == [1, 2, t3]
        st = store.stats()
        assert (st.rounds, st.client_rounds) == (3, 7)


def test_meta_and_stats(tmp_path: Path) -> None:
    with make_store(tmp_path) as store:
        assert store.get_meta("run", "dflt") == "dflt"
        store.set_meta("run", {"lr": 0.1, "clients": ["a", "b"]})
        assert store.stats() == StoreStats(0, 0, 0, 0, 0, 0, 0)
        with pytest.raises(TypeError):
            store.set_meta("bad", object())
    with HistoryStore.open(tmp_path / "store") as store:
        assert store.get_meta("run") == {"lr": 0.1, "clients": ["a", "b"]}


# --------------------------------------------------------------------------- key rotation (backups)


def test_rotation_after_shredding_leaves_backups_unable_to_recover_the_client(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "federation.key"  # kept out of the store directory, as documented
    key_file.parent.mkdir()
    with make_store(tmp_path, key_file=key_file) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 2, ["a", "b"])
        store._index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / "store", backup, ignore=shutil.ignore_patterns("store.lock"))
    with HistoryStore.open(tmp_path / "store") as store:
        old_key = key_file.read_bytes()
        store.destroy_client_key("a")
        store.rotate_federation_key()
        assert key_file.read_bytes() != old_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        view = next(store.reader().rounds())
        with pytest.raises(KeyDestroyedError):
            view.update("a")
        assert_arrays_equal(view.update("b"), delta(101))
    with HistoryStore.open(tmp_path / "store") as store:  # reopens under the new key
        assert_arrays_equal(next(store.reader().rounds()).update("b"), delta(101))
    # The backup still holds a's wrapped key, but only the old federation key opened it.
    with pytest.raises(KeyFileError, match="does not open this store"):
        HistoryStore.open(backup, key_file=key_file)


@pytest.mark.parametrize("crash_after_commit", [True, False])
def test_an_interrupted_rotation_is_finished_or_undone_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after_commit: bool
) -> None:
    import fedforget.server.store.history_store as module

    with make_store(tmp_path) as store:
        store.write_initial_model(small_model(0))
        run_rounds(store, 1, 1, ["a", "b"])
        real_replace = os.replace

        class Crash(Exception):
            pass

        def replace(src: object, dst: object) -> None:
            if str(src).endswith("federation.key.next"):
                raise Crash()
            real_replace(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(module.os, "replace", replace)
        if not crash_after_commit:
            monkeypatch.setattr(store._index, "transaction", lambda: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            store.rotate_federation_key()
        monkeypatch.undo()
    if crash_after_commit:
        assert (tmp_path / "store" / "federation.key.next").exists()
    with HistoryStore.open(tmp_path / "store") as store:
        assert not (tmp_path / "store" / "federation.key.next").exists()
        assert_arrays_equal(next(store.reader().rounds()).update("b"), delta(101))


# --------------------------------------------------------------------------- an index that authenticates itself


def _edit(path: Path, statement: str, *params: object) -> None:
    """An edit made with any SQLite client, outside fedforget."""
    conn = sqlite3.connect(path / "index.sqlite")
    try:
        assert conn.execute(statement, params).rowcount >= 1
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("UPDATE updates SET num_examples = 99 WHERE round = 1 AND client_id = 'c1'", "updates(trajectory=1, round=1, client_id='c1')"),
        ("UPDATE updates SET weight = 0.5 WHERE round = 2 AND client_id = 'c2'", "updates(trajectory=1, round=2, client_id='c2')"),
        ("UPDATE updates SET client_id = 'c9' WHERE round = 1 AND client_id = 'c2'", "updates(trajectory=1, round=1, client_id='c9')"),
        (
            "UPDATE updates SET blob_id = (SELECT blob_id FROM updates WHERE round = 2 AND client_id = 'c1') "
            "WHERE round = 1 AND client_id = 'c1'",
            "updates(trajectory=1, round=1, client_id='c1')",
        ),
        ("UPDATE versions SET blob_id = (SELECT blob_id FROM versions WHERE version = 2) WHERE version = 1", "versions(trajectory=1, version=1)"),
        ("UPDATE rounds SET metrics = '{\"loss\": 0}' WHERE round = 2", "rounds(trajectory=1, round=2)"),
        ("UPDATE state SET value = 2 WHERE key = 'current_trajectory'", "state(key='current_trajectory')"),
        ("UPDATE data_keys SET created_at = 'then' WHERE owner = 'c1'", "data_keys(key_id="),
    ],
)
def test_an_edited_index_row_is_refused_naming_the_row(two_round_store: Path, statement: str, named: str) -> None:
    _edit(two_round_store, statement)
    with pytest.raises(RowAuthenticationError, match=re.escape(named)):
        HistoryStore.open(two_round_store)
    with pytest.raises(RowAuthenticationError, match=re.escape(named)):
        HistoryStore.open(two_round_store, readonly=True)


def test_readers_never_return_edited_numbers(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:  # edited while a handle is open: the readers check too
        _edit(two_round_store, "UPDATE updates SET weight = 0.99 WHERE round = 2 AND client_id = 'c1'")
        with pytest.raises(RowAuthenticationError, match=re.escape("updates(trajectory=1, round=2, client_id='c1')")):
            list(store.reader().rounds())
        assert [v.round for v in store.reader().rounds(1, 1)] == [1]  # round 1 is intact


def test_a_deleted_update_row_shows_in_its_round(two_round_store: Path) -> None:
    _edit(two_round_store, "DELETE FROM updates WHERE round = 2 AND client_id = 'c2'")
    with HistoryStore.open(two_round_store, readonly=True) as store:
        with pytest.raises(RowAuthenticationError, match=r"round 2 of trajectory 1 was committed with participants \['c1', 'c2'\].*rows of \['c2'\] were deleted"):
            list(store.reader().rounds())


def test_a_deleted_meta_row_is_refused_naming_it(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        store.set_meta("unlearning_in_progress", {"clients": ["c1"]})
        store.set_meta("unlearning_in_progress", None)  # cleared by setting, never by deleting
    _edit(two_round_store, "DELETE FROM meta WHERE key = 'unlearning_in_progress'")
    with pytest.raises(RowAuthenticationError, match=re.escape("meta rows ['unlearning_in_progress'] were deleted")):
        HistoryStore.open(two_round_store)


def test_a_read_only_open_takes_no_lock_writes_nothing_and_refuses_writes(two_round_store: Path) -> None:
    before = {p.name: p.read_bytes() for p in two_round_store.iterdir() if p.is_file()}
    with HistoryStore.open(two_round_store) as writer, HistoryStore.open(two_round_store, readonly=True) as reader:
        assert writer.last_completed_round() == reader.last_completed_round() == 2
        assert_arrays_equal(next(reader.reader().rounds()).update("c1"), delta(100))
        with pytest.raises(StoreError, match="read-only"):
            reader.commit_round(3, small_model(3))
        with pytest.raises(StoreError, match="read-only"):
            reader.destroy_client_key("c1")
    after = {p.name: p.read_bytes() for p in two_round_store.iterdir() if p.is_file()}
    assert after == before | {"store.lock": after["store.lock"]}  # only the writer's lock file was written


def test_the_ledger_hash_of_an_update_is_of_its_stored_numbers(tmp_path: Path) -> None:
    from fedforget.arrays import model_hash

    with make_store(tmp_path, update_dtype="float16") as store:
        store.write_initial_model(small_model(0))
        store.record_update(1, "c1", delta(1), num_examples=3, weight=1.0)
        store.commit_round(1, small_model(1))
        (record,) = store.committed_round(1, 1).participants
        stored = next(store.reader().rounds()).update("c1")
    assert record.update_hash == model_hash(stored) != model_hash(delta(1))  # fp16-rounded, as kept
    assert (record.client_id, record.num_examples, record.weight) == ("c1", 3, 1.0)


def test_old_global_models_can_be_shredded_one_by_one(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        old = store.model_versions(1)
        store.fork(base_version=0, info={"kind": "unlearning"})
        with pytest.raises(StoreError, match="current trajectory 2 uses"):
            store.shred_models([old[0]])  # the shared initial model stays readable
        destroyed = store.shred_models([old[2]])
        assert len(destroyed) == 1 and old[2] not in store.readable_model_blobs()
        with pytest.raises(KeyDestroyedError, match="global model was destroyed"):
            store.reader(1).model(2)
        assert_arrays_equal(store.reader(1).model(1), small_model(1))  # its own key: still readable
        store.rotate_federation_key()
    with HistoryStore.open(two_round_store) as store:  # every row re-sealed under the new key
        assert_arrays_equal(store.reader(1).model(1), small_model(1))


def test_a_rotation_never_launders_an_edited_row(two_round_store: Path) -> None:
    with HistoryStore.open(two_round_store) as store:
        _edit(two_round_store, "UPDATE updates SET num_examples = 1000 WHERE round = 1 AND client_id = 'c1'")
        with pytest.raises(RowAuthenticationError, match=re.escape("updates(trajectory=1, round=1, client_id='c1')")):
            store.rotate_federation_key()


def test_importing_the_store_does_not_import_flower() -> None:
    code = "import sys, fedforget.server.store.history_store, fedforget.server.store.inspection; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
