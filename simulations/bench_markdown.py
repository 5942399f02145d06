"""``OUT/bench.md``: the unlearning bench's figures as markdown tables, each row judged against the targets.

The README and ``docs/bench/`` quote these tables; generating them from
``bench.json`` keeps the quoted figures exactly the measured ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedforget.evidence.forgetting import CLASS_DROP_PTS, FORGET_GAP_PTS

ACCURACY_GAP_PTS = 1.0
ASR_OVER_RETRAIN = 0.02
MIA_AUC_GAP = 0.03
CLIENT_EPOCHS_RATIO = 0.2
ROUND_TRIPS_RATIO = 0.25
TARGETS = (
    f"accuracy gap ≤ {ACCURACY_GAP_PTS:g} point, ASR ≤ retrain's + {ASR_OVER_RETRAIN:g}, "
    f"|MIA AUC − retrain's| ≤ {MIA_AUC_GAP:g}, client epochs ≤ {CLIENT_EPOCHS_RATIO:g} and round trips ≤ "
    f"{ROUND_TRIPS_RATIO:g} of retrain's"
)

OVER_FORGETTING = (
    f"Over-forgetting: forget-set accuracy more than {FORGET_GAP_PTS:g} points below the retrain's, or a class's "
    f"test accuracy more than {CLASS_DROP_PTS:g} points below it (judged on the mean over seeds)"
)

_HEADER = (
    "| variant | round trips / retrain | client epochs / retrain | modelled deployed speed-up | acc gap (pts) "
    "| ASR | MIA AUC − retrain | over-forgetting | targets |\n|---|---|---|---|---|---|---|---|---|"
)


def over_forgetting_cell(figures: Mapping[str, object]) -> str:
    """"yes"/"no" (the verdict on the mean figures), with the seeds flagged on their own; "–" for benches before it."""
    if "over_forgetting" not in figures:
        return "–"
    verdict = "yes" if figures["over_forgetting"] else "no"
    seeds = figures.get("over_forgetting_seeds")
    return verdict if not seeds else f"{verdict} ({seeds} seed{'s' * (seeds != 1)} flagged)"


def missed_targets(figures: Mapping[str, float]) -> list[str]:
    """Which of the issue's targets a variant's mean figures miss, and by how much."""
    missed: list[str] = []
    if figures["accuracy_gap_pts"] > ACCURACY_GAP_PTS:
        missed.append(f"accuracy by {figures['accuracy_gap_pts'] - ACCURACY_GAP_PTS:.2f} pts")
    asr_over = figures["backdoor_asr"] - figures["retrain_backdoor_asr"] - ASR_OVER_RETRAIN
    if asr_over > 0:
        missed.append(f"ASR by {asr_over:.3f}")
    if abs(figures["mia_auc_gap"]) > MIA_AUC_GAP:
        missed.append(f"MIA by {abs(figures['mia_auc_gap']) - MIA_AUC_GAP:.3f}")
    if figures["client_epochs_ratio"] > CLIENT_EPOCHS_RATIO + 1e-9 or figures["round_trips_ratio"] > ROUND_TRIPS_RATIO + 1e-9:
        missed.append("cost")
    return missed


def run_markdown(run: Mapping[str, object]) -> str:
    """One federation's table: every variant but retrain, against retrain."""
    strategies: Mapping[str, Mapping[str, float]] = run["strategies"]  # type: ignore[assignment]
    retrain = strategies["retrain"]
    partition = "IID" if run["partition"] == "iid" else f"Dirichlet α={run['alpha']:g}"
    lines = [
        f"**{run['dataset']}, {partition}** (retrain: ASR {retrain['backdoor_asr']:.3f}, "
        f"MIA AUC {retrain['mia_auc']:.3f}, {retrain['round_trips']:.0f} round trips)",
        "",
        _HEADER,
    ]
    store: Mapping[str, object] = run.get("store") or {}  # type: ignore[assignment]
    if "bytes_ratio_to_fp32" in store:
        lines[1:1] = [
            "",
            f"History: updates stored as `{store['update_encoding']}`, Δt {store['retention_interval']}: "
            f"{store['update_bytes_per_client_round']:.0f} bytes per client-round, "
            f"{store['bytes_ratio_to_fp32']:.3f}x the fp32 model's {store['fp32_model_bytes']:.0f} bytes.",
        ]
    for label, f in strategies.items():
        if label == "retrain":
            continue
        missed = missed_targets(f)
        lines.append(
            f"| `{label}` | {f['round_trips_ratio']:.2f} | {f['client_epochs_ratio']:.2f} "
            f"| {f['modelled_deployment_speedup']:.1f}x "
            f"| {f['accuracy_gap_pts']:+.2f} ± {f['accuracy_gap_pts_std']:.2f} "
            f"| {f['backdoor_asr']:.3f} ± {f['backdoor_asr_std']:.3f} "
            f"| {f['mia_auc_gap']:+.3f} ± {f['mia_auc_gap_std']:.3f} "
            f"| {over_forgetting_cell(f)} "
            f"| {'all met' if not missed else 'missed: ' + ', '.join(missed)} |"
        )
    forgetting = forgetting_markdown(strategies)
    return "\n".join(lines) + (f"\n\n{forgetting}" if forgetting else "")


_FORGETTING_HEADER = (
    "| variant | forget-set acc (retrain's) | forget gap (pts) | remaining clients' acc gap (pts) "
    "| worst class drop (pts) | over-forgetting |\n|---|---|---|---|---|---|"
)


def forgetting_markdown(strategies: Mapping[str, Mapping[str, float]]) -> str:
    """What over-forgetting is judged by, per variant: empty for a bench.json from before it was measured."""
    rows = [
        f"| `{label}` | {f['forget_accuracy']:.3f} ({f['retrain_forget_accuracy']:.3f}) "
        f"| {f['forget_accuracy_gap_pts']:+.2f} ± {f['forget_accuracy_gap_pts_std']:.2f} "
        f"| {f['remaining_accuracy_gap_pts']:+.2f} ± {f['remaining_accuracy_gap_pts_std']:.2f} "
        f"| {f['worst_class_drop_pts']:.1f} ± {f['worst_class_drop_pts_std']:.1f} | {over_forgetting_cell(f)} |"
        for label, f in strategies.items()
        if label != "retrain" and "over_forgetting" in f
    ]
    return "" if not rows else "\n".join(["Over-forgetting, against the retrain:", "", _FORGETTING_HEADER, *rows])


def bench_markdown(document: Mapping[str, object]) -> str:
    """Every federation of a ``bench.json`` (quick or full) as markdown."""
    runs: list[Mapping[str, object]] = document["runs"] if "runs" in document else [document]  # type: ignore[assignment]
    seeds = document["seeds"]
    head = (
        f"Mean ± std over {seeds} seed{'s' * (seeds != 1)}. Targets for the best approximate strategy: {TARGETS}. "  # type: ignore[operator]
        f"{OVER_FORGETTING}. "
        f"Settings chosen on {document['chosen_on']}"
        + (f"; held out: {', '.join(document['held_out'])}." if document["held_out"] else ".")  # type: ignore[arg-type]
    )
    return "\n\n".join([head, *(run_markdown(run) for run in runs)]) + "\n"
