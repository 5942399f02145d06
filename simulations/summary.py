"""The terminal summary of a verification run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

FIGURES = (
    ("test_accuracy", "test acc"),
    ("forget_accuracy", "forget acc"),
    ("remaining_accuracy", "remaining acc"),
    ("backdoor_asr", "backdoor ASR"),
    ("mia_auc", "MIA AUC"),
    ("lira_auc", "LiRA AUC"),
)

CANARY_FIGURES = (
    ("canary_fit", "canaries fit"),
    ("canary_lira_tpr_at_1pct_fpr", "canary LiRA TPR@1%"),
)
"""Shown when the forgotten clients planted mislabelled canaries (``--canaries``)."""

LEGEND = (
    "How to read it (not a verdict): forgetting is good where 'unlearned' matches 'retrain' in every column. "
    "Accuracies: higher is better; backdoor ASR: lower is better; "
    "MIA/LiRA AUC: 0.5 means members cannot be told apart; "
    "canaries fit: the share of mislabelled canaries predicted with their wrong label (memorised)."
)
"""Printed under every table: a reading guide, worded so that nobody takes it for this run's verdict."""


def _cell(figures: dict[str, object], key: str) -> str:
    value, std = figures.get(key), figures.get(f"{key}_std")
    if value is None:
        return "-"
    return f"{value:.3f}" if not std else f"{value:.3f} ± {std:.3f}"


def print_verification(verification: dict[str, object], out: Path, console: Console) -> None:
    """One table per unlearning: original vs unlearned vs exact retrain, with a legend and any warning."""
    seeds = verification["seeds"]
    for entry in verification["unlearning"]:  # type: ignore[union-attr]
        meaningless = entry.get("meaningless")
        table = Table(
            title=f"Forgetting client {entry['client']} before round {entry['round']} "
            f"({entry['strategy']}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''})"  # type: ignore[arg-type]
            + (" [bold red]MEANINGLESS[/]" if meaningless else ""),
        )
        shown = FIGURES + (CANARY_FIGURES if entry["original"].get("canary_fit") is not None else ())
        table.add_column("model")
        for _, title in shown:
            table.add_column(title, justify="right")
        for role in ("original", "unlearned", "retrain"):
            table.add_row(role, *(_cell(entry[role], key) for key, _ in shown))
        console.print(table)
        console.print(LEGEND)
        judged = entry.get("over_forgetting")
        if isinstance(judged, dict):
            console.print(
                "[bold red]OVER-FORGETTING[/]: " + escape("; ".join(judged["reasons"]))
                if judged["flagged"] else
                f"over-forgetting: no (forget-set accuracy {judged['forget_gap_pts']:+.1f} points below the "
                f"retrain's, worst class {judged['worst_class_drop_pts']:.1f} points below it)"
            )
        if meaningless:
            console.print(f"[bold red]WARNING[/]: {escape(str(meaningless))}")
        distance = entry["distance_to_retrain"]
        console.print(
            f"distance to retrain: L2 {_cell(distance, 'l2')}, JS {_cell(distance, 'js')} "
            f"(original: L2 {_cell(distance, 'original_l2')}, JS {_cell(distance, 'original_js')}); "
            f"evidence {entry['evidence_seconds']:.1f} s, shadow training {entry['shadow_training_seconds']:.1f} s"
        )
    console.print(f"verification: {out / 'verification.json'}, plots: {out / 'plots'}, models: {out / 'models'}")
