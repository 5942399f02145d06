"""A Flower ClientApp that trains any torch ``nn.Module`` on the client's own data.

The app answers Flower's standard ``train`` and ``evaluate`` messages exactly as
Flower's FedAvg expects (one ArrayRecord, one MetricRecord with
``num-examples``), so it works with any FedAvg-style server, and the server
records it as it would any Flower ClientApp. It also answers ``train.unlearn``,
what the client-side unlearning strategies (gradient ascent, relabel,
misdirect) ask a withdrawing client to run on its own data.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn
from torch.utils.data import Dataset

from fedforget import wire
from fedforget.client.local_privacy import local_dp_mod
from fedforget.client.training import evaluate, train_local

DEFAULT_LOCAL_EPOCHS = 1.0
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ClientData:
    """One client's private data: what it trains on and what it evaluates on."""

    train: Dataset
    evaluate: Dataset | None = None


class ClientTask(Protocol):
    """What a ClientApp needs to know about the model and the local data.

    Implementations must be picklable (the simulation engine ships them to its
    worker processes) and should cache ``load_data``, which runs for every message.
    """

    def client_id(self, context: Context) -> str:
        """A stable name for this client; it seeds its batch order, so replayed rounds train alike."""
        ...

    def build_model(self, context: Context) -> nn.Module:
        """A freshly initialised model of the federation's architecture (which the run config may name)."""
        ...

    def load_data(self, context: Context) -> ClientData:
        """This client's training (and optional evaluation) data."""
        ...


def training_seed(seed: int, server_round: int, client_id: str) -> int:
    """Seed for a client's batch order in a round, equal across runs and replays."""
    return zlib.crc32(f"{seed}:{server_round}:{client_id}".encode())


def load_weights(model: nn.Module, arrays: wire.Arrays) -> None:
    """Load server-sent arrays into ``model``; a mismatch is an error, not a partial load."""
    state = {name: torch.from_numpy(np.array(value, copy=True)) for name, value in arrays.items()}
    model.load_state_dict(state, strict=True)


def model_arrays(model: nn.Module) -> wire.Arrays:
    """The model's weights as named numpy arrays in state_dict order."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def make_client_app(task: ClientTask, mods: Sequence[Mod] = ()) -> ClientApp:
    """Build a ClientApp that trains and evaluates ``task``'s model on ``task``'s data.

    ``mods`` (Flower client mods) run before fedforget's own :func:`local_dp_mod`,
    which clips and noises a training reply when the train config asks for local DP.
    """
    app = ClientApp(mods=[*mods, local_dp_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get(wire.CONFIG_KEY, ConfigRecord())
        model = task.build_model(context)
        load_weights(model, wire.arrays_from_record(msg.content[wire.ARRAYS_KEY]))
        data = task.load_data(context)
        server_round = int(config.get(wire.SERVER_ROUND, 0))
        result = train_local(
            model,
            data.train,
            epochs=float(config.get(wire.LOCAL_EPOCHS, DEFAULT_LOCAL_EPOCHS)),
            lr=float(config.get(wire.LEARNING_RATE, DEFAULT_LEARNING_RATE)),
            batch_size=int(config.get(wire.BATCH_SIZE, DEFAULT_BATCH_SIZE)),
            seed=training_seed(int(config.get(wire.SEED, 0)), server_round, task.client_id(context)),
        )
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: result.num_examples,
                wire.LOCAL_EPOCHS: result.epochs,
                "train-loss": result.mean_loss,
            }
        )
        content = RecordDict(
            {wire.ARRAYS_KEY: wire.record_from_arrays(model_arrays(model)), wire.METRICS_KEY: metrics}
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_model(msg: Message, context: Context) -> Message:
        data = task.load_data(context)
        dataset = data.evaluate if data.evaluate is not None else data.train
        model = task.build_model(context)
        load_weights(model, wire.arrays_from_record(msg.content[wire.ARRAYS_KEY]))
        result = evaluate(model, dataset)
        metrics = MetricRecord(
            {wire.NUM_EXAMPLES: result.num_examples, "eval-loss": result.loss, "eval-accuracy": result.accuracy}
        )
        return Message(content=RecordDict({wire.METRICS_KEY: metrics}), reply_to=msg)

    @app.train("unlearn")
    def unlearn(msg: Message, context: Context) -> Message:
        """Client-side unlearning on this client's own data (gradient ascent, relabelling or misdirection)."""
        from fedforget.client.unlearning import unlearn_on_client
        from fedforget.strategies.client_methods import method_from_config

        config = dict(msg.content.config_records.get(wire.CONFIG_KEY, ConfigRecord()))
        seed = int(config.pop(wire.SEED, 0))  # type: ignore[call-overload]
        model = task.build_model(context)
        load_weights(model, wire.arrays_from_record(msg.content[wire.ARRAYS_KEY]))
        arrays, epochs = unlearn_on_client(model, task.load_data(context).train, method_from_config(config), seed=seed)
        content = RecordDict(
            {
                wire.ARRAYS_KEY: wire.record_from_arrays(arrays),
                wire.METRICS_KEY: MetricRecord({wire.LOCAL_EPOCHS: epochs}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app
