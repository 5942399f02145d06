"""Message keys and array conversions shared by the ServerApp and the ClientApps.

Both sides must agree on these names; keeping them in one module means a
renamed key cannot silently break one side only. The train/evaluate keys are
Flower's ``FedAvg`` defaults, so fedforget's server also talks to unchanged
Flower clients.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedforget.arrays import Arrays

ARRAYS_KEY = "arrays"
"""RecordDict key of the ArrayRecord carrying model weights (Flower's FedAvg default)."""
CONFIG_KEY = "config"
"""RecordDict key of the ConfigRecord carrying instructions (Flower's FedAvg default)."""
METRICS_KEY = "metrics"
"""RecordDict key of the MetricRecord in replies."""
NUM_EXAMPLES = "num-examples"
"""Metric FedAvg weights by: the number of training examples a client used."""
LOCAL_EPOCHS = "local-epochs"
"""Config key (instruction) and metric key (work done): epochs of local training."""
LEARNING_RATE = "lr"
BATCH_SIZE = "batch-size"
SEED = "seed"
SERVER_ROUND = "server-round"

CLIENT_UNLEARNING_MESSAGE = "train.unlearn"
"""Message type asking a withdrawing client to unlearn itself on its own data.

Its ConfigRecord names the method (gradient ascent, relabelling,
misdirection) and holds its settings, as
:func:`fedforget.strategies.client_methods.method_config` writes them, plus
``seed``; its ArrayRecord is the model to start from."""


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_LENGTH = {1: struct.Struct("<H"), 2: struct.Struct("<I"), 3: struct.Struct("<I")}
"""The header-length field of each ``.npy`` format version (its major number)."""


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an Array's bytes: no copy, and no Python parsing of its header.

    Flower's ``Array.numpy()`` runs ``np.load``, which parses every array's
    ``.npy`` header with ``ast`` and copies the data out. Reading a
    1.2M-parameter reply of 38 arrays that way took about 3 ms per reply, about
    a tenth of recording it, and recording runs beside the clients' training.
    The Array's own dtype and shape say what follows the header, so only the
    header's length is read, and the header is checked to say exactly what
    ``np.save`` writes for them. A header that says anything else (Fortran
    order, another byte order) is read by ``np.load``, as before.
    """
    data = array.data
    if array.stype != SType.NUMPY or data[:6] != _NPY_MAGIC or data[6] not in _NPY_HEADER_LENGTH:
        return array.numpy()  # raises on what is not numpy data
    length_field = _NPY_HEADER_LENGTH[data[6]]
    start = 8 + length_field.size
    (header_length,) = length_field.unpack_from(data, 8)
    dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
    said = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    offset = start + header_length
    count = math.prod(shape)
    if data[start : start + len(said)] != said or len(data) - offset != count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def array_views(record: ArrayRecord) -> Arrays:
    """Read-only views of an ArrayRecord's arrays (:func:`array_view`), keeping names and order."""
    return {name: array_view(array) for name, array in record.items()}


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """Copy an ArrayRecord into plain, writable numpy arrays, keeping names and order."""
    return {name: np.array(array_view(array), copy=True) for name, array in record.items()}


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """Wrap named numpy arrays in an ArrayRecord, keeping names and order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})

