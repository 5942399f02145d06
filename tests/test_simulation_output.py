"""What a person reads after a simulation: the divergence guard, the evidence table and the plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from fedforget.simulations import plots
from fedforget.simulations.learning import STUCK_ROUNDS, evidence_problem, training_problem
from fedforget.simulations.progress import ConsoleObserver
from fedforget.simulations.summary import LEGEND, print_verification


def _rounds(*accuracies: float, loss: float = 0.5) -> list[dict[str, object]]:
    return [
        {"round": i + 1, "test_accuracy": accuracy, "test_loss": loss, "participants": ["0"], "seconds": 0.1}
        for i, accuracy in enumerate(accuracies)
    ]


def test_a_learning_model_raises_no_alarm():
    assert training_problem(_rounds(0.12, 0.55, 0.81, 0.9)) is None


def test_a_nan_loss_is_a_divergence_whatever_the_accuracy():
    rounds = _rounds(0.5, 0.6)
    rounds[1]["test_loss"] = math.nan
    assert "diverged" in training_problem(rounds)  # type: ignore[operator]


def test_accuracy_near_chance_for_several_rounds_means_not_learning():
    stuck = _rounds(*[0.097, 0.114, 0.101, 0.113, 0.098][:STUCK_ROUNDS + 2])
    problem = training_problem(stuck)
    assert problem is not None and "near chance" in problem and "--lr" in problem
    assert training_problem(stuck[: STUCK_ROUNDS - 1]) is None  # one or two slow rounds are no verdict yet
    assert training_problem(stuck + _rounds(0.6, 0.8, 0.9)) is None  # judged on the latest rounds


def test_the_observer_warns_once_as_soon_as_the_model_is_stuck():
    console = Console(record=True, width=300)
    observer = ConsoleObserver(console)
    observer.run_started(1, 5)
    for entry in _rounds(0.1, 0.1, 0.1, 0.1, 0.1):
        observer.round_finished(entry)
    shown = console.export_text()
    assert shown.count("WARNING: the model is not learning") == 1
    assert shown.index("WARNING") > shown.index(f"round   {STUCK_ROUNDS}/5")


def test_evidence_on_a_model_that_never_learned_is_meaningless():
    assert evidence_problem({"original": 0.95, "unlearned": 0.94, "retrain": 0.94}) is None
    problem = evidence_problem({"original": 0.1, "unlearned": 0.11, "retrain": 0.93})
    assert problem is not None and problem.startswith("meaningless") and "original and unlearned models" in problem


def _verification(meaningless: str | None) -> dict[str, object]:
    figures = {"test_accuracy": 0.1, "forget_accuracy": 0.1, "remaining_accuracy": 0.1, "backdoor_asr": 0.0,
               "mia_auc": 0.5, "lira_auc": None}
    return {
        "seeds": [0],
        "unlearning": [{
            "client": "3", "round": 4, "strategy": "retrain", "meaningless": meaningless,
            "original": figures, "unlearned": figures, "retrain": figures,
            "distance_to_retrain": {"l2": 0.0, "js": 0.0, "original_l2": 1.0, "original_js": 0.1},
            "evidence_seconds": 1.0, "shadow_training_seconds": 0.0,
        }],
    }


def test_the_evidence_table_has_a_legend_and_flags_meaningless_evidence(tmp_path: Path):
    console = Console(record=True, width=1000)
    print_verification(_verification("meaningless: the original model(s) never learned"), tmp_path, console)
    shown = console.export_text()
    assert LEGEND in shown.splitlines()  # one whole line
    assert "MEANINGLESS" in shown and "WARNING: meaningless: the original model(s) never learned" in shown

    console = Console(record=True, width=1000)
    print_verification(_verification(None), tmp_path, console)
    assert "MEANINGLESS" not in console.export_text()


def test_a_group_unlearning_prints_one_line_naming_its_size(tmp_path: Path):
    """report.json keeps an entry per client; a hundred clients withdrawn at once are one unlearning to read."""
    from fedforget.commands.simulate import _print_run_summary

    def entry(client: str, index: int, together: list[str]) -> dict[str, object]:
        return {"client": client, "round": 10, "strategy": "subtract", "seconds": 2.0, "client_epochs": 40,
                "test_accuracy_before": 0.9, "test_accuracy_after": 0.89, "unlearning_index": index,
                "clients_unlearned_together": together}

    group = [str(c) for c in range(100)]
    report = {"final_test_accuracy": 0.9, "rounds": [{}], "wall_seconds": 1.0,
              "unlearning": [entry(c, 0, group) for c in group] + [entry("7", 1, ["7"])],
              "store": {"bytes": 1e6, "client_rounds": 10, "path": str(tmp_path)}}
    console = Console(record=True, width=1000)
    _print_run_summary(report, tmp_path, console)
    shown = console.export_text()
    assert shown.count("forgotten before round") == 2
    assert "100 clients together (0, 1, 2, ...) forgotten before round 10 by subtract" in shown
    assert "client 7 forgotten before round 10 by subtract" in shown


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, kept open instead of saved."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    return figures


def test_the_backdoor_plot_has_a_title_and_labels_every_bar_zero_included(drawn):
    means = {"original": [0.97], "unlearned": [0.0], "retrain": [0.0]}
    stds = {role: [0.0] for role in means}
    plots.plot_backdoor(Path("unused.png"), ["3"], means, stds)
    (ax,) = drawn[0].axes
    assert ax.get_title()
    labels = [text.get_text() for text in ax.texts]
    assert labels.count("0.00") == 2 and "0.97" in labels
    zero_bars = [bar for bar in ax.patches if bar.get_height() == 0]
    assert len(zero_bars) == 2 and all(bar.get_linewidth() > 0 for bar in zero_bars)  # drawn as a line
    assert ax.get_ylim()[0] < 0  # the zero line sits above the axis, not on it


def test_the_accuracy_plot_has_a_title_a_final_value_and_its_legend_clear_of_the_withdrawal_label(drawn):
    runs = [_rounds(0.5, 0.8, 0.9, 0.95)]
    plots.plot_accuracy(Path("unused.png"), runs, [("3", 3)])
    (ax,) = drawn[0].axes
    assert ax.get_title()
    assert "95.0%" in [text.get_text() for text in ax.texts]
    legend = ax.get_legend()
    anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.y1 <= 0  # below the axes, where no withdrawal label is drawn


def test_the_membership_roc_plot_has_a_title_and_each_model_s_auc(drawn):
    import numpy as np

    from fedforget.evidence.membership import AttackResult

    def attack(auc: float) -> AttackResult:
        grid = np.linspace(0, 1, 11)
        return AttackResult(auc, 0.0, 0.0, grid, grid, 10, 10)

    plots.plot_roc(Path("unused.png"), "Membership of client 3's training data",
                   {role: {"population": attack(auc)} for role, auc in
                    (("original", 0.61), ("unlearned", 0.52), ("retrain", 0.51))})
    figure = drawn[0]
    assert figure._suptitle.get_text().startswith("Membership of client 3")
    (ax,) = figure.axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"original (AUC 0.610)", "unlearned (AUC 0.520)", "retrain (AUC 0.510)"} <= set(legend)
