"""PNG plots of a verification run: accuracy over rounds, backdoor success, membership ROC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedforget.evidence.membership import AttackResult  # noqa: E402

ROLE_COLOURS = {"original": "#c0392b", "unlearned": "#2980b9", "retrain": "#27ae60"}
# Retrain is drawn dashed on top, so an unlearned curve that coincides with it stays visible.
ROLE_STYLES = {"original": "-", "unlearned": "-", "retrain": "--"}


def plot_accuracy(path: Path, runs: Sequence[list[dict[str, object]]], withdrawals: Sequence[tuple[str, int]]) -> None:
    """Test accuracy per round (mean and min–max band over seeds), withdrawals marked, final value labelled.

    The legend sits below the axes, so no withdrawal label can run into it.
    """
    rounds = [int(e["round"]) for e in runs[0]]
    values = np.array([[float(e["test_accuracy"]) for e in run] for run in runs])  # type: ignore[arg-type]
    mean = values.mean(axis=0)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(rounds, mean, marker="o", color="#34495e", label="test accuracy")
    if len(runs) > 1:
        ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), alpha=0.2, color="#34495e",
                        label=f"range over {len(runs)} seeds")
    ax.annotate(f"{mean[-1]:.1%}", (rounds[-1], mean[-1]), textcoords="offset points", xytext=(0, -14),
                ha="center", color="#34495e")
    for client, before_round in withdrawals:
        ax.axvline(before_round - 0.5, color="#c0392b", linestyle="--", label=f"client {client} withdraws")
        ax.annotate(f"client {client} withdraws", (before_round - 0.5, 0.04), rotation=90, ha="right",
                    color="#c0392b", xycoords=("data", "axes fraction"))
    ax.set_title("Test accuracy of the global model per round")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    _save(fig, path)


def plot_backdoor(path: Path, labels: Sequence[str], means: dict[str, list[float]], stds: dict[str, list[float]]) -> None:
    """Backdoor attack success rate of the original, unlearned and retrained models per unlearning.

    Every bar carries its value, and is outlined so that a rate of 0 still shows as a line.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    width = 0.25
    x = np.arange(len(labels))
    for offset, role in enumerate(("original", "unlearned", "retrain")):
        bars = ax.bar(x + (offset - 1) * width, means[role], width, yerr=stds[role], capsize=3,
                      color=ROLE_COLOURS[role], edgecolor=ROLE_COLOURS[role], linewidth=2, label=role)
        ax.bar_label(bars, labels=[f"{value:.2f}" for value in means[role]], padding=3, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"client {label}" for label in labels])
    ax.set_title("Backdoor success rate (forgotten: unlearned falls to retrain)")
    ax.set_ylabel("backdoor attack success rate")
    ax.set_ylim(-0.04, 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    _save(fig, path)


ATTACK_TITLES = {
    "population": "loss-threshold attack",
    "lira": "offline LiRA attack",
    "canary-population": "loss-threshold attack, mislabelled canaries",
    "canary-lira": "offline LiRA attack, mislabelled canaries",
}


def plot_roc(path: Path, title: str, attacks: dict[str, dict[str, AttackResult]]) -> None:
    """ROC curves of the membership attacks on the forgotten client's data, one curve per model."""
    kinds = [k for k in ATTACK_TITLES if any(k in by_kind for by_kind in attacks.values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for role, by_kind in attacks.items():
            result = by_kind.get(kind)
            if result is None:
                continue
            ax.plot(result.fpr, result.tpr, color=ROLE_COLOURS[role], linestyle=ROLE_STYLES[role],
                    linewidth=2.5 if role == "unlearned" else 1.5, label=f"{role} (AUC {result.auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance (AUC 0.5)")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(ATTACK_TITLES[kind])
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nforgotten: the unlearned curve matches the retrain curve", fontsize=11)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    directory: Path,
    verification: dict[str, object],
    timelines: Sequence[list[dict[str, object]]],
    attacks: dict[str, dict[str, dict[str, AttackResult]]],
    withdrawals: Sequence[tuple[str, int]],
) -> list[Path]:
    """All plots of a verification run; returns the files written."""
    written = [directory / "accuracy.png"]
    plot_accuracy(written[0], timelines, withdrawals)
    entries = verification["unlearning"]  # type: ignore[assignment]
    if entries and entries[0]["original"].get("backdoor_asr") is not None:  # type: ignore[index]
        labels = [str(e["client"]) for e in entries]  # type: ignore[index]
        means = {r: [e[r]["backdoor_asr"] for e in entries] for r in ("original", "unlearned", "retrain")}  # type: ignore[index]
        stds = {r: [e[r]["backdoor_asr_std"] for e in entries] for r in ("original", "unlearned", "retrain")}  # type: ignore[index]
        written.append(directory / "backdoor_asr.png")
        plot_backdoor(written[-1], labels, means, stds)
    for label, by_role in attacks.items():
        written.append(directory / f"mia_roc-client{label}.png")
        plot_roc(written[-1], f"Membership of client {label}'s training data", by_role)
    return written
