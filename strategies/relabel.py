"""Fine-tuning with modified labels: the withdrawing client trains to be wrong on its own data, then FedAvg recovers.

The practical baseline the unlearning literature names beside gradient
ascent (Graves et al., "Amnesiac Machine Learning", AAAI 2021; the "random
labels" baseline of Golatkar et al. 2020 and Kurmanji et al. 2023), in a
federation: the client's step is
:func:`fedforget.client.relabel.relabel_fine_tune` from the current global
model w_T, followed by the recovery rounds of every client-side strategy
(:mod:`fedforget.strategies.client_side`). The literature warns that it
over-forgets; the evidence flags it when it does
(:mod:`fedforget.evidence.forgetting`).

Stop rule, chosen on digits only (the quick bench's federation, seeds 0 and
1): the client stops once its accuracy on its own data (true labels) falls
to ``relabel_accuracy_floor`` = 0.5, or after ``relabel_epochs`` = 2 epochs,
whichever comes first. Floors 0.1, 0.3, 0.5 and 0.7 and both modes were
tried on seed 0 (budget 5 epochs), floors 0.3 and 0.5 on seed 1: after the
recovery rounds the backdoor ASR was 0.10-0.20 for all of them (0.003 before recovery: the recovery rounds bring part of the backdoor
back), and floor 0.5 with random labels lost the least accuracy (0.0 and
+0.3 points) with no class more than 6 points below the retrain's.
Complementary labels left a higher ASR (0.20 on seed 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedforget.strategies.client_methods import RELABEL_MODES, RelabelSettings
from fedforget.strategies.client_side import ClientSideUnlearner
from fedforget.strategies.settings import StrategySettings, setting


@dataclass(frozen=True)
class RelabelStrategySettings(StrategySettings):
    """The client's relabelling fine-tune and the recovery after it (defaults chosen on digits)."""

    strategy: ClassVar[str] = "relabel"

    relabel_mode: str = setting(
        "random", "random: cross-entropy against a random wrong class; complementary: minimise −log(1 − p_true)",
        choices=RELABEL_MODES,
    )
    relabel_lr: float = setting(0.05, "the client's fine-tuning learning rate (the simulation's digits lr)",
                                minimum=0.0, exclusive_minimum=True)
    relabel_epochs: float = setting(2.0, "step budget: at most this many epochs over the client's data",
                                    minimum=0.0, exclusive_minimum=True)
    relabel_batch_size: int = setting(32, "the fine-tune's batch size", minimum=1)
    relabel_accuracy_floor: float = setting(
        0.5, "stop rule: the client stops once its accuracy on its own data falls to this (chosen on digits)",
        minimum=0.0, maximum=1.0,
    )
    recovery_rounds: int = setting(
        2, "FedAvg rounds with the remaining clients after the strategy's own step", minimum=0
    )


class Relabel(ClientSideUnlearner):
    """Fine-tuning with random or complementary labels by the withdrawing client, then FedAvg recovery.

    Parameters
    ----------
    settings:
        :class:`RelabelStrategySettings`.
    context:
        The federation's local epochs E (each recovery round trains E epochs).
    """

    name: ClassVar[str] = "relabel"
    Settings: ClassVar[type[StrategySettings]] = RelabelStrategySettings
    settings: RelabelStrategySettings

    def method(self) -> RelabelSettings:
        s = self.settings
        return RelabelSettings(lr=s.relabel_lr, epochs=s.relabel_epochs, batch_size=s.relabel_batch_size,
                               accuracy_floor=s.relabel_accuracy_floor, mode=s.relabel_mode)
