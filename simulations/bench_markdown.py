"""``OUT/bench.md``: the unlearning bench's figures as markdown tables, each row judged against the targets.

The README and ``docs/bench/`` quote these tables; generating them from
``bench.json`` keeps the quoted figures exactly the measured ones.
"""

from __future__ import annotations

from collections.abc import Mapping

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

_HEADER = (
    "| variant | round trips / retrain | client epochs / retrain | modelled deployed speed-up | acc gap (pts) "
    "| ASR | MIA AUC − retrain | targets |\n|---|---|---|---|---|---|---|---|"
)


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
            f"| {'all met' if not missed else 'missed: ' + ', '.join(missed)} |"
        )
    return "\n".join(lines)


def bench_markdown(document: Mapping[str, object]) -> str:
    """Every federation of a ``bench.json`` (quick or full) as markdown."""
    runs: list[Mapping[str, object]] = document["runs"] if "runs" in document else [document]  # type: ignore[assignment]
    seeds = document["seeds"]
    head = (
        f"Mean ± std over {seeds} seed{'s' * (seeds != 1)}. Targets for the best approximate strategy: {TARGETS}. "  # type: ignore[operator]
        f"Settings chosen on {document['chosen_on']}"
        + (f"; held out: {', '.join(document['held_out'])}." if document["held_out"] else ".")  # type: ignore[arg-type]
    )
    return "\n\n".join([head, *(run_markdown(run) for run in runs)]) + "\n"
