"""Measured evidence of forgetting: backdoor canaries, membership inference and model distances.

Each function compares one model against data or against another model; a
verification report runs them on the original model (trained with the
withdrawing client), the unlearned model and the exact retrained model (which
never saw the client), so the unlearned model can be placed between the two.

Pure torch + numpy + scikit-learn, with no Flower and no network: the server
uses it for simulation reports, and a withdrawing client re-checks the published
model against its own data with the same code.
"""

from fedforget.evidence.backdoor import (
    Trigger,
    apply_trigger,
    attack_success_rate,
    natural_target_rate,
    poison_dataset,
)
from fedforget.evidence.distance import accuracy, mean_js_divergence, parameter_l2, predict
from fedforget.evidence.membership import (
    AttackResult,
    example_losses,
    lira_offline,
    population_attack,
    train_shadow_models,
    true_class_logit_confidence,
)

__all__ = [
    "AttackResult",
    "Trigger",
    "accuracy",
    "apply_trigger",
    "attack_success_rate",
    "example_losses",
    "lira_offline",
    "mean_js_divergence",
    "natural_target_rate",
    "parameter_l2",
    "poison_dataset",
    "population_attack",
    "predict",
    "train_shadow_models",
    "true_class_logit_confidence",
]
