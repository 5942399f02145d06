"""Representation misdirection (RMU-style) by the withdrawing client, then FedAvg recovery.

Li et al., "The WMDP Benchmark" (ICML 2024), section 5: push the
activations a chosen layer produces on the forget data towards a scaled
random vector, with a retain loss keeping the rest. In a federation the
client's step is :func:`fedforget.client.misdirect.misdirect` from the
current global model w_T. The retain loss needs data the client may use:
with whole-client withdrawal it has none, so the remaining clients' recovery
rounds (:mod:`fedforget.strategies.client_side`) play that role; they
contribute training, never raw data.

Stop rule, chosen on digits only (``fedforget bench unlearning --quick``):
the client stops once its accuracy on its own data (true labels) falls to
``misdirect_accuracy_floor`` = 0.5, or after ``misdirect_epochs`` = 2 epochs,
whichever comes first.
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
        2.0, "c = this × the mean activation norm on the client's data (RMU's steering coefficient, made relative)",
        minimum=0.0, exclusive_minimum=True,
    )
    misdirect_lr: float = setting(0.05, "the client's learning rate (the simulation's digits lr)",
                                  minimum=0.0, exclusive_minimum=True)
    misdirect_epochs: float = setting(2.0, "step budget: at most this many epochs over the client's data",
                                      minimum=0.0, exclusive_minimum=True)
    misdirect_batch_size: int = setting(32, "the misdirection's batch size", minimum=1)
    misdirect_accuracy_floor: float = setting(
        0.5, "stop rule: the client stops once its accuracy on its own data falls to this (chosen on digits)",
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
