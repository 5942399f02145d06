"""Local differential privacy on the client: Flower's ``LocalDpMod``, set up from the train config.

Under ``--dp local`` the server's train config names z, C and δ
(:func:`fedforget.privacy.local_dp_config`). This mod hands every ``train``
message to Flower's own ``LocalDpMod`` with those values (sensitivity C, and
the ε that makes its noise std z·C), then says in the reply's metrics what it
added, so the server records and accounts the noise the client really added,
and refuses a reply that added none.

The noise comes from numpy's unseeded global generator, on purpose: a seed the
server knew would let it take the noise off, which is what local DP protects
against. The history records the noised replies, so a round is still
recomputable from what is stored.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable

from fedforget import wire
from fedforget.privacy import CLIPPING_NORM, NOISE_STD, local_settings_from_config


def local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip and noise this client's training reply when the train config asks for local DP."""
    config = msg.content.config_records.get(wire.CONFIG_KEY, ConfigRecord())
    settings = local_settings_from_config(config) if msg.metadata.message_type == MessageType.TRAIN else None
    if settings is None:
        return call_next(msg, context)
    clip = settings.clipping_norm
    reply = LocalDpMod(clip, clip, settings.local_epsilon, settings.delta)(msg, context, call_next)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records.get(wire.METRICS_KEY)
    if metrics is None:
        metrics = next(iter(reply.content.metric_records.values()))
    metrics[NOISE_STD] = settings.noise_multiplier * clip
    metrics[CLIPPING_NORM] = clip
    return reply
