"""The served model of a sharded federation: the prediction ensemble of its shard models.

Each shard model is trained on its own clients only, and the ensemble averages
the shards' softmax outputs. Removing a client from one shard's model
therefore removes it from the served model exactly: no other part of it ever
saw the client's data.

The ensemble's ``forward`` returns the log of the averaged probabilities, so
every consumer that treats outputs as logits (argmax, softmax, cross-entropy,
the evidence's attacks) sees the ensemble's own predictive distribution.

On disk an ensemble is one arrays file whose names are ``shard<i>/<name>``
(:func:`ensemble_arrays`), so a published combined model is one file, and
``fedforget client verify`` rebuilds the ensemble from it
(:func:`model_from_served_arrays`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedforget.arrays import Arrays
from fedforget.client.app import load_weights

_SHARD_KEY = re.compile(r"^shard(?P<index>\d+)/(?P<name>.+)$")


class ShardEnsemble(nn.Module):
    """Average the softmax outputs of ``members``; ``forward`` returns its log (a valid logit vector)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one shard model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(member(x), dim=-1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


def ensemble_arrays(shard_models: Sequence[Arrays]) -> Arrays:
    """One arrays mapping holding every shard model, under ``shard<i>/`` prefixes."""
    return {f"shard{index}/{name}": value for index, arrays in enumerate(shard_models) for name, value in arrays.items()}


def split_ensemble_arrays(arrays: Arrays) -> list[Arrays] | None:
    """The shard models of an ensemble's arrays, in shard order; None if ``arrays`` is one plain model."""
    shards: dict[int, Arrays] = {}
    plain = 0
    for key, value in arrays.items():
        match = _SHARD_KEY.match(key)
        if match is None:
            plain += 1
            continue
        shards.setdefault(int(match["index"]), {})[match["name"]] = value
    if not shards:
        return None
    if plain or sorted(shards) != list(range(len(shards))):
        raise ValueError(
            f"arrays mix shard models ({sorted(shards)}) with {plain} unprefixed array(s), or skip a shard: "
            "not an ensemble written by fedforget"
        )
    return [shards[index] for index in range(len(shards))]


def model_from_served_arrays(arrays: Arrays, build: Callable[[], nn.Module]) -> nn.Module:
    """The served model in eval mode: a :class:`ShardEnsemble` for an ensemble's arrays, else one model."""
    shards = split_ensemble_arrays(arrays)
    members = []
    for shard in shards if shards is not None else [arrays]:
        member = build()
        load_weights(member, shard)
        members.append(member)
    model: nn.Module = members[0] if shards is None else ShardEnsemble(members)
    model.eval()
    return model
