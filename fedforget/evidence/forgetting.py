"""Over-forgetting: an unlearned model that lost more than the exact retrain lost.

Backdoor ASR and membership AUC show *under*-forgetting (the client's
influence is still there). The opposite failure is as real: methods that
push the model away from the client's data (fine-tuning with wrong labels,
misdirection, gradient ascent) can take more with them, e.g. make the
client's ordinary examples, or whole classes, worse than a model that never
saw the client. The exact retrain is the yardstick: it never saw the client,
so whatever accuracy it keeps on the client's data and on each class is what
forgetting the client legitimately costs.

An unlearned model is flagged as over-forgetting when either

* its accuracy on the forget set (the client's clean training examples) is
  more than :data:`FORGET_GAP_PTS` points below the retrain's, or
* the test accuracy of some class is more than :data:`CLASS_DROP_PTS`
  points below the retrain's on that class.

Both thresholds were chosen on digits only (``fedforget bench unlearning
--quick``, 3 seeds): see their docstrings.

Pure numpy + torch: a withdrawing client could run it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from fedforget.evidence.distance import checked_logits

FORGET_GAP_PTS = 5.0
"""Forget-set accuracy more than this many points below the retrain's is over-forgetting.

Chosen on digits (the quick bench's federation, seeds 0 and 1): the
withdrawing client's clean forget set there has 43 examples (2.3 points
each). ``subtract`` and ``calibrated``, which meet the forgetting targets,
were 0 points from the retrain on it; the client-side methods from −2.3
(better than the retrain) to +33 points. 5 points is three examples: more
than one example of noise, far short of losing the set.
"""

CLASS_DROP_PTS = 10.0
"""Any class's test accuracy more than this many points below the retrain's is over-forgetting.

Chosen on digits (the quick bench's federation, seeds 0 and 1): each class
has about 36 test images (2.8 points each). The worst class of ``subtract``
and ``calibrated`` was one image (2.8-2.9 points) below the retrain's; the
client-side methods ranged from 0 to 86 points. 10 points is four images
of one class.
"""


def class_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy on the examples of each class 0..num_classes−1; ``None`` for a class with no example."""
    predicted = checked_logits(model, x, y).argmax(dim=1).numpy()
    out: list[float | None] = []
    for cls in range(num_classes):
        mine = y == cls
        out.append(float((predicted[mine] == cls).mean()) if mine.any() else None)
    return out


@dataclass(frozen=True)
class OverForgetting:
    """Whether an unlearned model forgot more than the retrain, and by what measure."""

    flagged: bool
    forget_gap_pts: float
    """Retrain's forget-set accuracy minus the unlearned model's, in points (positive: the unlearned forgot more)."""
    worst_class: int | None
    worst_class_drop_pts: float
    """Largest per-class test-accuracy drop below the retrain's, in points (0 if no class is worse)."""
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "flagged": self.flagged,
            "forget_gap_pts": self.forget_gap_pts,
            "worst_class": self.worst_class,
            "worst_class_drop_pts": self.worst_class_drop_pts,
            "reasons": list(self.reasons),
            "thresholds": {"forget_gap_pts": FORGET_GAP_PTS, "class_drop_pts": CLASS_DROP_PTS},
        }


def over_forgetting(
    forget_accuracy: float,
    class_accuracies: Sequence[float | None],
    retrain_forget_accuracy: float,
    retrain_class_accuracies: Sequence[float | None],
) -> OverForgetting:
    """Judge an unlearned model's forget-set and per-class accuracies against the retrain's."""
    if len(class_accuracies) != len(retrain_class_accuracies):
        raise ValueError(
            f"per-class accuracies of {len(class_accuracies)} and {len(retrain_class_accuracies)} classes "
            "cannot be compared: both models must be measured on the same test set"
        )
    gap = 100.0 * (retrain_forget_accuracy - forget_accuracy)
    drops = [
        (100.0 * (theirs - mine), cls)
        for cls, (mine, theirs) in enumerate(zip(class_accuracies, retrain_class_accuracies))
        if mine is not None and theirs is not None
    ]
    worst_drop, worst_class = max(drops, default=(0.0, None))
    reasons = []
    if gap > FORGET_GAP_PTS:
        reasons.append(f"forget-set accuracy {gap:.1f} points below the retrain's (more than {FORGET_GAP_PTS:g})")
    if worst_drop > CLASS_DROP_PTS:
        reasons.append(
            f"class {worst_class} test accuracy {worst_drop:.1f} points below the retrain's (more than {CLASS_DROP_PTS:g})"
        )
    return OverForgetting(
        flagged=bool(reasons),
        forget_gap_pts=gap,
        worst_class=worst_class if worst_drop > 0 else None,
        worst_class_drop_pts=max(worst_drop, 0.0),
        reasons=reasons,
    )


def over_forgetting_of(figures: Mapping[str, object], retrain: Mapping[str, object]) -> OverForgetting:
    """:func:`over_forgetting` on two models' evidence figures (``forget_accuracy``, ``class_accuracy``)."""
    return over_forgetting(
        float(figures["forget_accuracy"]),  # type: ignore[arg-type]
        figures["class_accuracy"],  # type: ignore[arg-type]
        float(retrain["forget_accuracy"]),  # type: ignore[arg-type]
        retrain["class_accuracy"],  # type: ignore[arg-type]
    )
