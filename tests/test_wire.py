"""Reading Flower Arrays without np.load: the same numbers, or np.load's own answer."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedforget import wire

SAVED_BY_FLOWER = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float32),
    np.array([True, False, True]),
    np.arange(5, dtype=np.int64),
    np.arange(6, dtype=np.float16).reshape(2, 3),
    np.arange(4, dtype=">f4"),
    np.zeros((0, 3), dtype=np.float32),
]


@pytest.mark.parametrize("saved", SAVED_BY_FLOWER, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_array_view_is_np_loads_array_without_a_copy(saved: np.ndarray) -> None:
    array = Array(saved)
    view = wire.array_view(array)
    loaded = array.numpy()
    assert view.dtype == loaded.dtype and view.shape == loaded.shape
    np.testing.assert_array_equal(view, loaded)
    assert not view.flags.writeable  # a view of the message's bytes, not a copy


def test_array_view_leaves_what_np_save_did_not_write_to_np_load() -> None:
    fortran = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    np.testing.assert_array_equal(wire.array_view(fortran), np.arange(6.0).reshape(2, 3))
    lying = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=Array(np.arange(3, dtype=np.float32)).data)
    view = wire.array_view(lying)  # the header says 3 elements, the Array 4: np.load answers, with 3
    assert view.shape == (3,)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        wire.array_view(Array(dtype="float32", shape=(1,), stype="torch.Tensor", data=b"\x00" * 4))


def test_arrays_from_record_copies_are_writable_and_keep_order() -> None:
    record = ArrayRecord({"b": Array(np.ones(3, np.float32)), "a": Array(np.zeros(2, np.int64))})
    arrays = wire.arrays_from_record(record)
    assert list(arrays) == ["b", "a"]
    arrays["b"] += 1  # a copy: the message's bytes stay as they were
    np.testing.assert_array_equal(wire.array_views(record)["b"], np.ones(3, np.float32))
