"""The bench's markdown tables judge each variant against the issue's targets from its own figures."""

from __future__ import annotations

from fedforget.simulations.bench_markdown import bench_markdown, missed_targets

MEETS = {
    "round_trips_ratio": 0.2, "client_epochs_ratio": 0.2, "modelled_deployment_speedup": 5.0,
    "accuracy_gap_pts": 0.9, "backdoor_asr": 0.03, "retrain_backdoor_asr": 0.01, "mia_auc_gap": -0.029,
    "round_trips": 3.0, "mia_auc": 0.5,
}


def _with_std(figures: dict[str, float]) -> dict[str, float]:
    return {**figures, **{f"{k}_std": 0.0 for k in figures}}


def test_figures_inside_every_target_miss_none() -> None:
    assert missed_targets(MEETS) == []


def test_each_missed_target_is_named_with_its_margin() -> None:
    figures = {**MEETS, "accuracy_gap_pts": 2.5, "backdoor_asr": 0.5, "mia_auc_gap": 0.05, "round_trips_ratio": 0.27}
    assert missed_targets(figures) == ["accuracy by 1.50 pts", "ASR by 0.470", "MIA by 0.020", "cost"]


def test_client_epochs_alone_over_the_budget_is_a_cost_miss() -> None:
    assert missed_targets({**MEETS, "client_epochs_ratio": 0.21}) == ["cost"]


def test_a_full_document_gives_one_table_per_federation_without_a_retrain_row() -> None:
    retrain = _with_std({**MEETS, "accuracy_gap_pts": 0.0, "round_trips": 15.0})
    run = {"partition": "dirichlet", "alpha": 0.3, "strategies": {"retrain": retrain, "subtract": _with_std(MEETS)}}
    document = {
        "seeds": 3, "chosen_on": "digits", "held_out": ["mnist"],
        "runs": [{**run, "dataset": "digits"}, {**run, "dataset": "mnist"}],
    }
    text = bench_markdown(document)
    assert "**digits, Dirichlet α=0.3**" in text and "**mnist, Dirichlet α=0.3**" in text
    assert text.count("| `subtract` |") == 2 and "| `retrain` |" not in text
    assert "held out: mnist" in text and "all met" in text


def test_the_over_forgetting_verdict_and_its_flagged_seeds_are_shown_per_variant() -> None:
    retrain = _with_std({**MEETS, "accuracy_gap_pts": 0.0, "round_trips": 15.0})
    forgetting = _with_std({"forget_accuracy": 0.8, "retrain_forget_accuracy": 0.95, "forget_accuracy_gap_pts": 15.0,
                            "remaining_accuracy_gap_pts": 2.0, "worst_class_drop_pts": 30.0})
    flagged = {**_with_std(MEETS), **forgetting, "over_forgetting": True, "over_forgetting_seeds": 2}
    clean = {**_with_std(MEETS), **forgetting, "over_forgetting": False, "over_forgetting_seeds": 0}
    document = {"seeds": 3, "chosen_on": "digits", "held_out": [], "dataset": "digits", "partition": "iid",
                "strategies": {"retrain": retrain, "relabel": flagged, "misdirect": clean, "old": _with_std(MEETS)}}
    main, detail = bench_markdown(document).split("Over-forgetting, against the retrain:")
    rows = {line.split(" | ")[0]: line for line in main.splitlines() if line.startswith("| `")}
    assert "| yes (2 seeds flagged) |" in rows["| `relabel`"]
    assert "| no |" in rows["| `misdirect`"]
    assert "| – |" in rows["| `old`"]  # a bench.json from before the flag existed
    assert "| `relabel` | 0.800 (0.950) | +15.00 ± 0.00 | +2.00 ± 0.00 | 30.0 ± 0.0 | yes (2 seeds flagged) |" in detail
    assert "`old`" not in detail
