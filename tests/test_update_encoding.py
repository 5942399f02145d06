"""Lossy update encodings of the history store (int8, top-k) and their error feedback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedforget.arrays import model_hash
from fedforget.server.store.blob_codec import ModelSpec, decode_arrays, encode_arrays, encode_lossy
from fedforget.server.store.errors import KeyDestroyedError
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.store.update_encoding import UpdateEncoding

from test_history_store import SPEC, delta, small_model


def _big_spec_update(seed: int, n: int = 20_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_normal((n // 100, 100)) * 1e-2).astype(np.float32),
            "steps": np.array(seed, dtype=np.int64)}


BIG_SPEC = ModelSpec.from_arrays(_big_spec_update(0))


@pytest.mark.parametrize("method", ["int8", "topk"])
def test_a_lossy_blob_decodes_to_exactly_the_numbers_the_encoder_reports(method: str) -> None:
    update = delta(3)
    payload, used, stored = encode_lossy(update, SPEC, method=method, fraction=0.25)
    assert used == method
    decoded = decode_arrays(payload, SPEC)
    assert list(decoded) == list(update)
    assert model_hash(decoded) == model_hash(stored)  # bit for bit: the ledger's hash is of the blob's numbers
    assert decoded["bn.num_batches_tracked"] == update["bn.num_batches_tracked"]  # non-floating arrays exact
    np.testing.assert_array_equal(decoded["mask"], update["mask"])
    if method == "topk":  # a quarter of each floating array, the largest, exactly
        w, got = update["fc.weight"].ravel(), decoded["fc.weight"].ravel()
        kept = np.flatnonzero(got)
        assert kept.size == int(np.ceil(0.25 * w.size))
        assert np.abs(w[kept]).min() >= np.abs(np.delete(w, kept)).max()
        np.testing.assert_array_equal(got[kept], w[kept])
    else:  # int8: within half a step of max|x| / 127
        w = update["fc.weight"]
        assert np.abs(decoded["fc.weight"] - w).max() <= np.abs(w).max() / 127 * 0.5 + 1e-9


@pytest.mark.parametrize("pattern", ["normal", "period-64-peaks", "period-64-zeros", "few-large", "all-equal"])
def test_topk_of_a_large_array_keeps_exactly_its_largest_values_whatever_their_pattern(pattern: str) -> None:
    # Large arrays narrow the selection with a strided sample first. A period of 64 fools that
    # sample: it sees only the peaks (cos) or only the zeros (sin). The selection must stay the exact top k.
    n, rng = 131_072, np.random.default_rng(7)
    w = {
        "normal": rng.standard_normal(n),
        "period-64-peaks": np.cos(np.arange(n) * 2 * np.pi / 64) * (1 + 1e-6 * rng.random(n)),
        "period-64-zeros": np.sin(np.arange(n) * 2 * np.pi / 64) * (1 + 1e-6 * rng.random(n)),
        "few-large": np.where(rng.random(n) < 0.01, 1 + rng.random(n), 1e-3 * rng.random(n)),
        "all-equal": np.ones(n),
    }[pattern].astype(np.float32)
    spec = ModelSpec.from_arrays({"w": w})
    got = decode_arrays(encode_lossy({"w": w}, spec, method="topk", fraction=0.05)[0], spec)["w"]
    kept = np.flatnonzero(got)
    assert kept.size == int(np.ceil(0.05 * n))
    assert np.abs(w[kept]).min() >= np.abs(np.delete(w, kept)).max()
    np.testing.assert_array_equal(got[kept], w[kept])


def test_lossy_bytes_against_fp32_and_a_corrupt_topk_blob_is_refused() -> None:
    update = _big_spec_update(1)
    fp32 = len(encode_arrays(update, BIG_SPEC)[0])
    int8 = len(encode_lossy(update, BIG_SPEC, method="int8")[0])
    topk = len(encode_lossy(update, BIG_SPEC, method="topk", fraction=0.05)[0])
    assert int8 < 0.27 * fp32
    assert topk < 0.1 * fp32
    payload = bytearray(encode_lossy(update, BIG_SPEC, method="topk", fraction=0.05)[0])
    payload[25:29] = (10**6).to_bytes(4, "little")  # the count chunk's value: more values than the array holds
    with pytest.raises(ValueError, match="kept values"):
        decode_arrays(bytes(payload), BIG_SPEC)


def test_a_non_finite_update_is_stored_exactly_at_fp32() -> None:
    update = delta(2)
    update["fc.weight"][0, 0] = np.nan
    payload, used, stored = encode_lossy(update, SPEC, method="topk", fraction=0.1)
    assert used == "float32"
    assert model_hash(decode_arrays(payload, SPEC)) == model_hash(stored)


def test_parse_names_the_allowed_encodings() -> None:
    assert str(UpdateEncoding.parse("topk:0.050")) == "topk:0.05"
    assert UpdateEncoding.parse("int8").lossy and not UpdateEncoding.parse("float16").lossy
    for bad in ("topk", "topk:0", "topk:1.5", "topk:x", "int4", "float16:2"):
        with pytest.raises(ValueError, match="topk:F"):
            UpdateEncoding.parse(bad)


def _record(store: HistoryStore, rounds: range, clients: tuple[str, ...] = ("c1", "c2")) -> None:
    for r in rounds:
        for i, c in enumerate(clients):
            store.record_update(r, c, delta(r * 10 + i), num_examples=5, weight=0.5)
        store.commit_round(r, small_model(r))


def test_error_feedback_keeps_the_sum_of_stored_updates_within_one_rounds_error(tmp_path: Path) -> None:
    """Σ_t stored_t = Σ_t U_t − residual_T: the sums that subtract and fedrecovery read stay close."""
    with HistoryStore.create(tmp_path / "s", federation_id="f", model_spec=SPEC, update_dtype="topk:0.1") as store:
        assert json.loads((tmp_path / "s" / "store.json").read_text())["options"]["update_dtype"] == "topk:0.1"
        store.write_initial_model(small_model(0))
        _record(store, range(1, 21))
        true_sum = sum(delta(r * 10)["fc.weight"].astype(np.float64) for r in range(1, 21))
        stored_sum = sum(v.update("c1")["fc.weight"].astype(np.float64) for v in store.reader().rounds())
        one_round = np.abs(delta(10)["fc.weight"]).max()
        assert np.abs(stored_sum - true_sum).max() < 2 * one_round  # without feedback: ~90% of Σ dropped
        no_feedback = sum(decode_arrays(encode_lossy(delta(r * 10), SPEC, method="topk", fraction=0.1)[0], SPEC)[
            "fc.weight"].astype(np.float64) for r in range(1, 21))
        assert np.abs(stored_sum - true_sum).sum() < 0.5 * np.abs(no_feedback - true_sum).sum()


def _fresh_hash(update: dict[str, np.ndarray]) -> str:
    """The hash of an update int8-encoded with no carried residual."""
    return model_hash(encode_lossy(update, SPEC, method="int8")[2])


def _stored_hash(store: HistoryStore, round: int, client: str) -> str:
    rows = store.committed_round(store.current_trajectory(), round).participants
    return next(p.update_hash for p in rows if p.client_id == client)


def test_residuals_advance_only_on_commit_reset_on_open_and_fork_and_go_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with HistoryStore.create(path, federation_id="f", model_spec=SPEC, update_dtype="int8") as store:
        store.write_initial_model(small_model(0))
        _record(store, range(1, 3))
        assert store._feedback.clients == ["c1", "c2"]
        assert _stored_hash(store, 2, "c1") != _fresh_hash(delta(20))  # round 2 carried round 1's error
        store.record_update(3, "c1", delta(30), num_examples=5, weight=1.0)
        store.discard_uncommitted()  # a round that never commits leaves the residual where it was
        store.record_update(3, "c1", delta(30), num_examples=5, weight=1.0)
        store.record_update(3, "c1", delta(30), num_examples=5, weight=1.0)  # re-recorded: encoded once more, same
        store.commit_round(3, small_model(3))
        after_two = _stored_hash(store, 3, "c1")
        store.destroy_client_key("c2")
        assert store._feedback.clients == ["c1"]  # shredded with the client's key
        with pytest.raises(KeyDestroyedError):
            next(store.reader().rounds()).update("c2")
        store.fork(base_version=2, info={})  # a new trajectory starts from no residual
        store.record_update(3, "c1", delta(30), num_examples=5, weight=1.0)
        store.commit_round(3, small_model(3))
        assert _stored_hash(store, 3, "c1") == _fresh_hash(delta(30)) != after_two
    with HistoryStore.open(path) as store:
        assert store.update_encoding == UpdateEncoding("int8")
        assert store._feedback.clients == []  # reset on resume (documented): the residual is never on disk
        store.record_update(4, "c1", delta(40), num_examples=5, weight=1.0)
        store.commit_round(4, small_model(4))
        assert _stored_hash(store, 4, "c1") == _fresh_hash(delta(40))
