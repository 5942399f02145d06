"""Did the model learn? The divergence guard of a simulated run, and of the evidence built on it.

A run whose loss became NaN, or whose test accuracy stayed near chance, still
finishes and writes every file: the guard says so loudly, marks
``report.json``, and marks the evidence of an unlearning whose models never
learned as meaningless (an untrained model "forgets" everything).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

NEAR_CHANCE_FACTOR = 2.0
"""Accuracy below twice the chance rate (20 % with ten classes) counts as near chance."""

STUCK_ROUNDS = 3
"""Rounds in a row near chance before the guard speaks: one slow round is not yet a verdict."""


def near_chance(accuracy: float, num_classes: int) -> bool:
    """Whether ``accuracy`` is no better than a model that never learned could get by luck."""
    return accuracy < NEAR_CHANCE_FACTOR / num_classes


def training_problem(rounds: Sequence[Mapping[str, object]], num_classes: int = 10) -> str | None:
    """Why the run's model has not learned, judged on the rounds so far; None if it has (or cannot be told).

    A NaN or infinite test loss in any round is a divergence; otherwise the
    model is stuck if its test accuracy was near chance in each of the last
    :data:`STUCK_ROUNDS` evaluated rounds.
    """
    evaluated = [r for r in rounds if isinstance(r.get("test_accuracy"), float)]
    for entry in evaluated:
        loss = entry.get("test_loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            return (
                f"the test loss became {loss} in round {entry['round']} (training diverged). "
                "Lower --lr (or --batch-size / --local-epochs)."
            )
    last = evaluated[-STUCK_ROUNDS:]
    if len(last) == STUCK_ROUNDS and all(near_chance(float(r["test_accuracy"]), num_classes) for r in last):  # type: ignore[arg-type]
        shown = ", ".join(f"{float(r['test_accuracy']):.1%}" for r in last)  # type: ignore[arg-type]
        return (
            f"test accuracy stayed near chance ({1 / num_classes:.0%}) in rounds {last[0]['round']}-{last[-1]['round']} "
            f"({shown}). Lower --lr, or check the data and model."
        )
    return None


def evidence_problem(accuracies: Mapping[str, float | None], num_classes: int = 10) -> str | None:
    """Why an unlearning's evidence proves nothing, given its models' test accuracies; None if it is sound."""
    untrained = [role for role, accuracy in accuracies.items() if accuracy is not None and near_chance(accuracy, num_classes)]
    if not untrained:
        return None
    shown = ", ".join(f"{role} {accuracies[role]:.1%}" for role in untrained)
    names = untrained[0] if len(untrained) == 1 else f"{', '.join(untrained[:-1])} and {untrained[-1]}"
    return (
        f"meaningless: the {names} model{'s' if len(untrained) > 1 else ''} never learned (test accuracy {shown}, "
        f"chance {1 / num_classes:.0%}), so these figures compare untrained models and say nothing about forgetting"
    )
