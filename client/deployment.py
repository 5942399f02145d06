"""The ClientApp ``flwr run`` starts on each organisation's SuperNode.

The model architecture comes from the run config (``model``, else
``dataset``), so it always matches the server's. The data is the organisation's own: its SuperNode's
``--node-config "data-file='/abs/path/data.npz'"`` names an ``.npz`` with
arrays ``x`` (N, C, H, W) float32 and ``y`` (N,) integer labels, shaped as the
architecture expects (``fedforget export-data`` writes shares of a built-in
dataset in this format, to try a deployment on one machine).

Flower 1.42 starts a fresh process for every message, so this module imports
only what training needs (no scikit-learn, no dataset libraries) and reads
one file per message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from torch import nn
from torch.utils.data import TensorDataset

from fedforget.client.app import ClientData, make_client_app
from fedforget.errors import FedforgetError

DATA_FILE = "data-file"


class NodeConfigError(FedforgetError):
    """The SuperNode's ``--node-config`` does not say which data to train on."""


class OrganisationTask:
    """A :class:`~fedforget.client.app.ClientTask` over the data file a SuperNode's node config names."""

    def client_id(self, context: Context) -> str:
        return str(_data_file(context))

    def build_model(self, context: Context) -> nn.Module:
        from fedforget.simulations.models import build_model

        torch.set_num_threads(1)
        # The same run config keys the server builds its model from (fedforget.run_config).
        spec = str(context.run_config.get("model") or context.run_config.get("dataset", "digits"))
        return build_model(spec, seed=int(context.run_config.get("seed", 0)))  # type: ignore[arg-type]

    def load_data(self, context: Context) -> ClientData:
        x, y = read_data_file(_data_file(context))
        return ClientData(train=TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))


def _data_file(context: Context) -> Path:
    if DATA_FILE not in context.node_config:
        raise NodeConfigError(
            "start the SuperNode with --node-config \"data-file='/abs/path/data.npz'\" "
            "(arrays x and y; `fedforget export-data` writes such files from a built-in dataset)"
        )
    return Path(str(context.node_config[DATA_FILE]))


def read_data_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise NodeConfigError(f"data-file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data or "y" not in data:
            raise NodeConfigError(f"data-file {path} must hold arrays 'x' and 'y', it holds {sorted(data.files)}")
        x = np.ascontiguousarray(data["x"], dtype=np.float32)
        y = np.ascontiguousarray(data["y"], dtype=np.int64)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise NodeConfigError(f"data-file {path}: x must be (N, C, H, W) and y (N,), got {x.shape} and {y.shape}")
    return x, y


app = make_client_app(OrganisationTask())
