"""Over-forgetting: judged against the retrain's forget-set and per-class accuracy, per seed and over seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedforget.evidence.forgetting import CLASS_DROP_PTS, FORGET_GAP_PTS, class_accuracy, over_forgetting
from fedforget.simulations.bench_unlearning import summarise

RETRAIN_CLASSES = [0.9, 0.8, 1.0]


def test_class_accuracy_is_measured_per_class_and_none_for_an_absent_class() -> None:
    model = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))  # predicts 0 for x > 0, 2 for x < 0
    x = np.array([[1.0], [2.0], [-1.0], [3.0]], dtype=np.float32)
    y = np.array([0, 0, 0, 2])
    assert class_accuracy(model, x, y, 3) == [pytest.approx(2 / 3), None, 0.0]


def test_an_unlearned_model_as_good_as_the_retrain_is_not_flagged() -> None:
    judged = over_forgetting(0.97, [0.92, 0.8, 1.0], 0.98, RETRAIN_CLASSES)
    assert not judged.flagged and judged.reasons == []
    assert judged.forget_gap_pts == pytest.approx(1.0) and judged.worst_class is None


def test_forget_accuracy_beyond_the_threshold_below_the_retrains_is_flagged() -> None:
    retrain = 0.95
    inside = over_forgetting(retrain - (FORGET_GAP_PTS - 0.5) / 100, RETRAIN_CLASSES, retrain, RETRAIN_CLASSES)
    beyond = over_forgetting(retrain - (FORGET_GAP_PTS + 0.5) / 100, RETRAIN_CLASSES, retrain, RETRAIN_CLASSES)
    assert not inside.flagged
    assert beyond.flagged and "forget-set accuracy" in beyond.reasons[0]


def test_a_class_lost_beyond_the_threshold_is_flagged_and_named() -> None:
    lost = [0.9, 0.8 - (CLASS_DROP_PTS + 1) / 100, 1.0]
    judged = over_forgetting(0.95, lost, 0.95, RETRAIN_CLASSES)
    assert judged.flagged and judged.worst_class == 1
    assert judged.worst_class_drop_pts == pytest.approx(CLASS_DROP_PTS + 1)
    assert "class 1" in judged.reasons[0]


def test_models_measured_on_different_class_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="same test set"):
        over_forgetting(0.9, [0.9, 0.9], 0.9, RETRAIN_CLASSES)


def test_the_bench_verdict_is_on_the_mean_over_seeds_and_counts_flagged_seeds() -> None:
    def seed(gap: float, drop: float) -> dict[str, float]:
        return {"forget_accuracy_gap_pts": gap, "worst_class_drop_pts": drop,
                "over_forgetting_seed": float(gap > FORGET_GAP_PTS or drop > CLASS_DROP_PTS)}

    one_bad_seed = summarise([seed(0.0, 2.0), seed(0.0, 3.0), seed(0.0, CLASS_DROP_PTS + 5)])
    assert one_bad_seed["over_forgetting"] is False and one_bad_seed["over_forgetting_seeds"] == 1
    always = summarise([seed(FORGET_GAP_PTS + 1, 0.0)] * 3)
    assert always["over_forgetting"] is True and always["over_forgetting_seeds"] == 3
    assert "over_forgetting_seed" not in always and always["forget_accuracy_gap_pts_std"] == 0.0
