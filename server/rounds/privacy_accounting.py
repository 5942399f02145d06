"""The (ε, δ) each client has spent, read from the history's own record of its noised rounds.

Every round trained under DP carries its noise std and clipping norm as round
metrics (:mod:`~fedforget.server.rounds.private_aggregation`), and every
participant its aggregation weight; so the account is computed from what was
done, not from the settings asked for. Each trajectory's own rounds count once
(a fork shares its parent's earlier rounds); a retrain's rounds are new
releases of the staying clients' data and add to their ε. Rounds an unlearning
strategy computed itself (no noise metric) are not DP releases: they are
counted in ``rounds_without_noise`` so that nobody reads ε as covering them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from fedforget.privacy import NOISE_STD, PRIVACY_META, PrivacySettings, client_noise_multiplier, epsilon_spent
from fedforget.server.store.history_store import HistoryStore


@dataclass(frozen=True)
class PrivacyAccount:
    """What DP training spent, per client and for the worst-off client."""

    settings: PrivacySettings
    epsilon_by_client: dict[str, float]
    noised_rounds: int
    rounds_without_noise: int

    @property
    def epsilon(self) -> float:
        """The ε that holds for every client (the largest spent)."""
        return max(self.epsilon_by_client.values(), default=0.0)

    def to_json(self) -> dict[str, object]:
        """``report.json``'s ``privacy`` block."""
        return {
            **self.settings.to_json(),
            "epsilon": self.epsilon,
            "epsilon_by_client": dict(sorted(self.epsilon_by_client.items())),
            "accountant": "Renyi DP (Google dp-accounting), per client, full participation, no amplification",
            "noised_rounds": self.noised_rounds,
            "rounds_without_noise": self.rounds_without_noise,
        }


def privacy_account(
    store: HistoryStore, settings: PrivacySettings, *, trajectories: Collection[int] | None = None
) -> PrivacyAccount:
    """Compose, per client, every noised round of every trajectory it took part in (or of ``trajectories``)."""
    multipliers: dict[str, list[float]] = {}
    noised = unnoised = 0
    for trajectory in store.trajectories():
        if trajectories is not None and trajectory.id not in trajectories:
            continue
        own_from = trajectory.base_version + 1 if trajectory.parent is not None else 1
        for view in store.reader(trajectory.id).rounds(start=own_from):
            if NOISE_STD not in view.metrics:
                unnoised += 1
                continue
            noised += 1
            for p in view.participants:
                multipliers.setdefault(p.client_id, []).append(client_noise_multiplier(view.metrics, p.weight))
    return PrivacyAccount(
        settings=settings,
        epsilon_by_client={client: epsilon_spent(zs, settings.delta) for client, zs in multipliers.items()},
        noised_rounds=noised,
        rounds_without_noise=unnoised,
    )


def withdrawn_privacy(store: HistoryStore, clients: Collection[str], trajectory: int) -> dict[str, object] | None:
    """What the ledger and the certificate state of DP for an unlearning of ``clients`` (None without DP).

    The settings, and the ε each withdrawn client spent at δ over every noised
    round it took part in (in any trajectory): the most its data could have
    revealed through the models released while it was in the federation.
    And whether the unlearning's own ``trajectory`` is a DP release: only if
    every round it added was noised (a retrain). An approximate strategy
    computes its model from recorded updates, and averages the client
    training it asks for without noise, so its model is covered by no ε.
    """
    stored = store.get_meta(PRIVACY_META)
    if stored is None:
        return None
    settings = PrivacySettings.from_json(stored)  # type: ignore[arg-type]
    account = privacy_account(store, settings)
    added = store.reader(trajectory).rounds(start=store.trajectory_info(trajectory).base_version + 1)
    return {
        **settings.to_json(),
        "epsilon": {client: account.epsilon_by_client.get(client, 0.0) for client in sorted(clients)},
        "rounds_without_noise": account.rounds_without_noise,
        "unlearned_model_noised": all(NOISE_STD in view.metrics for view in added),
    }
