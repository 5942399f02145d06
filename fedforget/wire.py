"""Message keys and array conversions shared by the ServerApp and the ClientApps.

Both sides must agree on these names; keeping them in one module means a
renamed key cannot silently break one side only. The train/evaluate keys are
Flower's ``FedAvg`` defaults, so fedforget's server also talks to unchanged
Flower clients.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

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


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """Copy an ArrayRecord into plain numpy arrays, keeping names and order."""
    return {name: np.array(array.numpy(), copy=True) for name, array in record.items()}


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """Wrap named numpy arrays in an ArrayRecord, keeping names and order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})

