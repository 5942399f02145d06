"""Representation misdirection (RMU-style) by the withdrawing client, then FedAvg recovery.

Li et al., "The WMDP Benchmark" (ICML 2024), section 5: push the
activations a chosen layer produces on the forget data towards a scaled
random vector, with a retain loss keeping the rest. In a federation the
client's step is :func:`fedforget.client.misdirect.misdirect` from the
current global model w_T. The retain loss needs data the client may use:
with whole-client withdrawal it has none, so the remaining clients' recovery
rounds (:mod:`fedforget.strategies.client_side`) play that role; they
contribute training, never raw data.

Stop rule and steering, chosen on digits only (the quick bench's federation,
seeds 0 and 1, steering 0.5/1/2/4 × floor 0.3/0.5, budget 2 epochs): the
client stops once its accuracy on its own data (true labels) falls to
``misdirect_accuracy_floor`` = 0.3, or after ``misdirect_epochs`` = 2 epochs,
whichever comes first; ``misdirect_steering`` = 1. That is the smallest
steering whose backdoor ASR after recovery averaged under 0.5 (0.48 and
0.42) with the accuracy gap under 2 points (+1.9, −0.3). Steering 2 and 4
brought the ASR down to 0.03-0.34 only by losing 5 to 21 points of accuracy
and 23 to 78 points on some class: no setting tried met the forgetting
targets. The misdirected layer sits upstream of the head, which keeps the
backdoor's mapping, and the recovery rounds restore the features it reads:
at steering 1 and floor 0.5 the ASR was 0.28-0.32 without recovery, and
0.43-0.91 after four recovery rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedforget.strategies.client_methods import MisdirectSettings
from fedforget.strategies.client_side import ClientSideUnlearner
from fedforget.strategies.settings import StrategySettings, setting


@dataclass(frozen=True)
class MisdirectStrategySettings(StrategySettings):
    """The client's misdirection and the recovery after it (defaults chosen on digits)."""

    strategy: ClassVar[str] = "misdirect"

    misdirect_layer: str = setting(
        "", "module whose output is steered (e.g. features.3); empty: the second-to-last nn.Linear"
    )
    misdirect_steering: float = setting(
        1.0, "c = this × the mean activation norm on the client's data (RMU's steering coefficient, made relative)",
        minimum=0.0, exclusive_minimum=True,
    )
    misdirect_lr: float = setting(0.05, "the client's learning rate (the simulation's digits lr)",
                                  minimum=0.0, exclusive_minimum=True)
    misdirect_epochs: float = setting(2.0, "step budget: at most this many epochs over the client's data",
                                      minimum=0.0, exclusive_minimum=True)
    misdirect_batch_size: int = setting(32, "the misdirection's batch size", minimum=1)
    misdirect_accuracy_floor: float = setting(
        0.3, "stop rule: the client stops once its accuracy on its own data falls to this (chosen on digits)",
        minimum=0.0, maximum=1.0,
    )
    recovery_rounds: int = setting(
        2, "FedAvg rounds with the remaining clients after the strategy's own step", minimum=0
    )


class Misdirect(ClientSideUnlearner):
    """RMU-style misdirection of one layer's activations by the withdrawing client, then FedAvg recovery.

    Parameters
    ----------
    settings:
        :class:`MisdirectStrategySettings`.
    context:
        The federation's local epochs E (each recovery round trains E epochs).
    """

    name: ClassVar[str] = "misdirect"
    Settings: ClassVar[type[StrategySettings]] = MisdirectStrategySettings
    settings: MisdirectStrategySettings

    def method(self) -> MisdirectSettings:
        s = self.settings
        return MisdirectSettings(layer=s.misdirect_layer, steering=s.misdirect_steering, lr=s.misdirect_lr,
                                 epochs=s.misdirect_epochs, batch_size=s.misdirect_batch_size,
                                 accuracy_floor=s.misdirect_accuracy_floor)
