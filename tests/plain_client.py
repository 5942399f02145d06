"""A ClientApp in the shape of Flower's quickstart-pytorch that knows nothing of fedforget.

Its own torch model and tabular data, Flower's standard ``train`` and
``evaluate`` messages, ``num-examples`` in its metrics, local epochs from the
run config, and no import of fedforget (a test checks that). Training is
full-batch gradient descent, so it is deterministic and a retrain can be
compared with a federation the withdrawn client never joined.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

app = ClientApp()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition ``i`` holds 20 + 10·i rows, so its size tells which partition a client trained on."""
    rng = np.random.default_rng(partition_id)
    x = rng.normal(size=(20 + 10 * partition_id, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    for _ in range(int(context.run_config.get("local-epochs", 1))):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(x)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    metrics = MetricRecord({"eval_acc": accuracy, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
