"""Differentially private training: its settings, each round's noise seed, and the privacy accounting.

The mechanisms themselves are Flower's (``flwr.serverapp.strategy``'s DP
wrappers, ``flwr.clientapp.mod.LocalDpMod``); the accountant is Google's
``dp-accounting`` (Rényi DP), the backend Flower's own ``flwr[dp]`` extra
installs. Nothing here adds noise or clips. This module imports neither
Flower nor torch, so settings are checked before either is loaded.

Three mechanisms, all per-client (user-level) DP with every client in every
round (no sampling amplification):

- ``central-fixed``: the server clips each reply's update to ``clipping_norm``
  and adds N(0, (z·C·max_k w_k)²) to the average, z·C/n for equal shares
  (``DifferentialPrivacyServerSideFixedClipping``, its noise sized for the
  largest share by :mod:`fedforget.server.rounds.private_aggregation`);
- ``central-adaptive``: the same, with the clipping norm adapted each round
  toward the median update norm from a noised count
  (``DifferentialPrivacyServerSideAdaptiveClipping``, Andrew et al. 2021);
- ``local``: each client clips its own update and adds N(0, (z·C)²) before
  replying (``LocalDpMod``); the server averages what arrives.

Accounting is per client and from what was recorded, not from the settings:
client k in a noised round with aggregation weight w_k, clipping norm C and
noise std s is a Gaussian release with noise multiplier s / (w_k·C) (FedAvg
weights by examples, so a client's sensitivity is w_k·C, not C/n); central
adaptive clipping also composes its noised clipped-count query. Every noised
round of every trajectory the client took part in counts: a retrain's rounds
are new releases of the staying clients' data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from fedforget.errors import FedforgetError

MECHANISMS = ("central-fixed", "central-adaptive", "local")
DEFAULT_DELTA = 1e-5
"""δ of every reported (ε, δ): below 1/N for the largest federation here (MNIST, 60000 examples)."""

NOISE_STD = "dp-noise-std"
"""Round metric: the std of the Gaussian noise each coordinate of the round's released model (or, under
local DP, of each reply) received. A round without it was not noised (an unlearning strategy computed it)."""
CLIPPING_NORM = "dp-clipping-norm"
"""Round metric: the L2 norm every update of the round was clipped to."""
COUNT_STD = "dp-count-std"
"""Round metric (central-adaptive): the std of the noise on the clipped-update count."""
NEXT_CLIPPING_NORM = "dp-next-clipping-norm"
"""Round metric (central-adaptive): the clipping norm the next round starts from."""

PRIVACY_META = "privacy"
"""History-store meta: the run's :class:`PrivacySettings`; a resume must use the same."""
NOISE_SEED_META = "privacy_noise_seed"
"""History-store meta: the secret from which every central round's noise seed is derived.

As sensitive as the raw updates: whoever holds it and a released model can take the noise off.
It never leaves the server (not in the ledger, not in a certificate, not in the train config)."""


class PrivacyError(FedforgetError, ValueError):
    """A differential-privacy setting is invalid, or a history's privacy record is inconsistent."""


@dataclass(frozen=True)
class PrivacySettings:
    """How training is made differentially private.

    Parameters
    ----------
    mechanism:
        One of :data:`MECHANISMS`.
    noise_multiplier:
        z: the noise std divided by the sensitivity of one client.
    clipping_norm:
        C: the L2 bound on each update (the initial one under ``central-adaptive``).
    delta:
        The δ at which ε is reported.
    """

    mechanism: str
    noise_multiplier: float
    clipping_norm: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise PrivacyError(f"--dp {self.mechanism!r} is not known; choose one of: {', '.join(MECHANISMS)}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"--noise-multiplier must be a positive number, got {self.noise_multiplier}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise PrivacyError(f"--clipping-norm must be a positive number, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PrivacySettings:
        return cls(
            mechanism=str(data["mechanism"]),
            noise_multiplier=float(data["noise_multiplier"]),  # type: ignore[arg-type]
            clipping_norm=float(data["clipping_norm"]),  # type: ignore[arg-type]
            delta=float(data.get("delta", DEFAULT_DELTA)),  # type: ignore[arg-type]
        )

    @property
    def central(self) -> bool:
        """The server adds the noise (and holds the noise seed)."""
        return self.mechanism != "local"

    @property
    def local_epsilon(self) -> float:
        """The ε to give Flower's ``LocalDpMod`` (with sensitivity C) so that its noise std is z·C.

        ``LocalDpMod`` calibrates the classic Gaussian mechanism, std = C·√(2 ln(1.25/δ))/ε; this
        inverts that formula so that all three mechanisms take the same z and are accounted alike.
        """
        return math.sqrt(2.0 * math.log(1.25 / self.delta)) / self.noise_multiplier


def round_noise_seed(secret: int, trajectory: int, server_round: int) -> np.ndarray:
    """The numpy seed of one central round's noise: a function of the run's secret, the trajectory and the round.

    The trajectory is part of it on purpose: a retrain (a new trajectory) draws
    *fresh* noise. Re-using the original round's noise would couple the retrain
    to the model already released: their difference would then show the
    withdrawn client's clipped contribution almost free of noise. The same
    trajectory and round always give the same noise, so any recorded round can
    be recomputed bit for bit from its stored inputs.
    """
    return np.random.SeedSequence([int(secret), int(trajectory), int(server_round)]).generate_state(8)


@contextlib.contextmanager
def seeded_numpy(seed: np.ndarray) -> Iterator[None]:
    """numpy's global generator seeded with ``seed`` inside, and as it was outside.

    Flower's DP wrappers draw from numpy's global generator; seeding it per
    round is what makes a round's noise a function of what the store records.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class Shaped(Protocol):
    """What a noise draw needs of an array: a numpy array, or the store's spec of one."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...


def gaussian_noise(std: float, like: Sequence[Shaped]) -> list[np.ndarray]:
    """One N(0, std²) array per array of ``like``, in order and in its dtype, from numpy's global generator.

    The same sequence as Flower's ``add_gaussian_noise_inplace``; both the
    server's draw and :func:`recorded_noise` use this one function, so the two
    cannot drift apart.
    """
    return [np.random.normal(0, std, a.shape).astype(a.dtype) for a in like]


def recorded_noise(
    secret: int, trajectory: int, server_round: int, mechanism: str, metrics: Mapping[str, float],
    like: Mapping[str, Shaped],
) -> dict[str, np.ndarray]:
    """The central noise a recorded round's model carries, drawn again from the run's secret.

    ``trajectory`` is the one the round was trained in (not a fork that copied
    it). Under ``central-adaptive`` Flower draws the noised clipped count
    first, so that draw is repeated, then the update noise of std
    ``metrics[NOISE_STD]`` (:func:`gaussian_noise`, in the order of ``like``).
    Only the server can do this: the secret never leaves it.
    """
    if mechanism not in ("central-fixed", "central-adaptive"):
        raise PrivacyError(f"only central DP adds server-side noise to regenerate, not {mechanism!r}")
    with seeded_numpy(round_noise_seed(secret, trajectory, server_round)):
        if mechanism == "central-adaptive":
            np.random.normal(0, float(metrics[COUNT_STD]))
        drawn = gaussian_noise(float(metrics[NOISE_STD]), list(like.values()))
    return dict(zip(like, drawn, strict=True))


def client_noise_multiplier(metrics: Mapping[str, float], weight: float) -> float:
    """z_k of one client in one noised round: noise std over that client's sensitivity (w_k·C)."""
    updates = float(metrics[NOISE_STD]) / (float(weight) * float(metrics[CLIPPING_NORM]))
    count_std = float(metrics.get(COUNT_STD, 0.0))
    if count_std <= 0:
        return updates
    # Two Gaussian queries compose like one with 1/z² = Σ 1/z_i²; the clipped count's
    # sensitivity is one bit, i.e. 1/2 once centred (Andrew et al. 2021, Theorem 1).
    return 1.0 / math.sqrt(updates**-2 + (2.0 * count_std) ** -2)


def epsilon_spent(noise_multipliers: Iterable[float], delta: float) -> float:
    """ε at ``delta`` of the composition of Gaussian releases with these noise multipliers (RDP accountant)."""
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    counts: dict[float, int] = {}
    for z in noise_multipliers:
        counts[float(z)] = counts.get(float(z), 0) + 1
    if not counts:
        return 0.0
    for z, count in counts.items():
        accountant.compose(dp_event.GaussianDpEvent(z), count)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, rounds: int) -> float:
    """The smallest z whose ``rounds`` full-participation releases spend at most ``epsilon`` at ``delta``.

    Solved with dp-accounting's own calibration over the same RDP accountant,
    so a target ε sets the noise without any tuning on data.
    """
    from dp_accounting import calibrate_dp_mechanism, dp_event, rdp

    return float(
        calibrate_dp_mechanism(
            rdp.RdpAccountant, lambda z: dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds),
            epsilon, delta,
        )
    )


ADAPTIVE_TARGET_QUANTILE = 0.5
"""central-adaptive: the share of updates left unclipped that the clipping norm aims at (Flower's and Andrew et al.'s default)."""
ADAPTIVE_CLIP_LR = 2.0
"""central-adaptive: η, the geometric learning rate of the clipping norm, C ← C·exp(−η(b̃ − γ)).

Chosen on digits (MNIST is held out), where 10 rounds are too few for Andrew et
al.'s and Flower's 0.2: C can grow by at most e^(η/2) per round. 240 clients,
10 rounds, 5 local epochs, ``--dp central-adaptive --target-epsilon 8
--clipping-norm 0.1``, against the same run without DP, seeds 0-4 (0-2 for
η ≤ 0.5). Gap in final test accuracy (non-DP mean 71.00 %), mean over seeds:
41.66 points at η = 0.2, 14.91 at 0.5, 4.39 at 1.0, −1.83 at 2.0, 1.55 at 3.0
(per-seed spread about ±13). The raw updates' median norm was 0.7-0.9 in
round 1 and 1.7-2.4 in round 10: at 0.2 C reached only 0.23-0.25 by round
10 and clipped every update of every round; at 2.0 it reached the median by
rounds 3-5, then swings around it by up to e^(±1) a round. 2.0 beat 1.0 in 4
of 5 paired seeds (+6.2 ± 4.2 points); 3.0 was within noise of 2.0 with
wider swings, so the smaller, 2.0, was taken."""
def adaptive_count_std(clients_per_round: int, noise_multiplier: float) -> float:
    """The noise std of central-adaptive's clipped-update count: max(n/20, z).

    n/20 is Andrew et al.'s recommendation; z keeps Flower's requirement z < 2σ_b
    at the large z that small federations need (the update noise is then at most 2/√3 z).
    """
    return max(clients_per_round / 20.0, noise_multiplier)


def planned_noise_multiplier(target_epsilon: float, delta: float, rounds: int) -> float:
    """The z to ask for so that a client in all ``rounds`` rounds spends at most ``target_epsilon``.

    Every mechanism makes each round one Gaussian release with noise
    multiplier z, so z = :func:`noise_multiplier_for` for all three.
    ``central-adaptive`` included: Flower's wrapper splits the z it is given
    into the update's z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the clipped count's
    σ_b, which compose (as :func:`client_noise_multiplier` composes them) into
    exactly z; and :class:`~fedforget.server.rounds.private_aggregation.AndrewAdaptiveClipping`
    noises with the norm the round clipped with (Andrew et al.'s order), so
    the norm's update cannot change the realised z_Δ. (Flower's own order,
    noising with the *next* norm, needed a margin for a shrinking norm.) The
    central noise is sized for the round's largest share of examples (a
    client's sensitivity is w_k·C), so the client with the largest share is
    charged exactly the target and every other client less; with equal shares,
    every client the target. The ε actually spent is computed from the
    recorded rounds, as always.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"--target-epsilon must be a positive number, got {target_epsilon}")
    if rounds < 1:
        raise PrivacyError(f"a DP plan needs at least one round, got {rounds}")
    return noise_multiplier_for(target_epsilon, delta, rounds)


LOCAL_NOISE_MULTIPLIER = "dp-local-noise-multiplier"
LOCAL_CLIPPING_NORM = "dp-local-clipping-norm"
LOCAL_DELTA = "dp-local-delta"


def local_dp_config(settings: PrivacySettings) -> dict[str, float]:
    """The train-config keys that tell a client to clip and noise its own reply (local DP)."""
    return {
        LOCAL_NOISE_MULTIPLIER: settings.noise_multiplier,
        LOCAL_CLIPPING_NORM: settings.clipping_norm,
        LOCAL_DELTA: settings.delta,
    }


def local_settings_from_config(config: Mapping[str, object]) -> PrivacySettings | None:
    """The local DP a train config asks for, or None."""
    if LOCAL_NOISE_MULTIPLIER not in config:
        return None
    return PrivacySettings(
        "local",
        float(config[LOCAL_NOISE_MULTIPLIER]),  # type: ignore[arg-type]
        float(config[LOCAL_CLIPPING_NORM]),  # type: ignore[arg-type]
        float(config.get(LOCAL_DELTA, DEFAULT_DELTA)),  # type: ignore[arg-type]
    )
