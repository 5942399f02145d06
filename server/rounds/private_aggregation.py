"""A round's average made differentially private by Flower's own DP wrappers, with its noise reproducible.

Wrapping :class:`~fedforget.server.rounds.recording.RecordingFedAvg` in a
Flower DP wrapper would record the wrong history: the wrapper adds its noise
*after* the inner strategy has aggregated (and recorded), so the store would
hold a model no client ever received. Here the order is turned inside out:
the recording strategy calls the wrapper, around a plain FedAvg average, and
records what comes out of it:

- the replies, after the wrapper clipped them in place (so the stored updates
  are the clipped ones that were averaged);
- the noised average (the model the clients receive next round);
- the noise std and clipping norm of the round, as round metrics, from which
  the accountant works (under adaptive clipping, the norm the round clipped
  and noised with, and apart from it the norm the next round starts from).

The noise is sized for the largest share of the round's examples, not for
1/n as Flower's wrappers size it. FedAvg weights a clipped update by its
client's share w_k = n_k/Σn, so that client moves the average by up to w_k·C:
Flower's std z·C/n gives it the multiplier z/(n·w_k), below z whenever the
shares are unequal (Flower's own accountant refuses unequal weights for that
reason). Noise of std z·C·max_k w_k gives the largest client exactly z and
every other client more, so ``--target-epsilon`` holds for every client;
with equal shares it is Flower's std. The shares come from the example
counts the clients report, which the server sees in the clear anyway (they
weight the average): DP here hides what the updates say, not how many
examples each client holds.

Flower draws the noise from numpy's global generator. Each call is made with
that generator seeded from :func:`fedforget.privacy.round_noise_seed` (the
run's secret, the trajectory and the round), and its state is restored after,
so a round's noise is a function of what the store records. Another thread
drawing from numpy's global generator during the call would take some of that
stream; nothing in fedforget's server does.

Under ``local`` DP the clients add the noise themselves (Flower's
``LocalDpMod``) and the server averages plainly: there is no server-side seed,
by design, since a server that could recompute the clients' noise could remove it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedforget.privacy import (
    ADAPTIVE_CLIP_LR,
    ADAPTIVE_TARGET_QUANTILE,
    CLIPPING_NORM,
    COUNT_STD,
    NEXT_CLIPPING_NORM,
    NOISE_SEED_META,
    NOISE_STD,
    PRIVACY_META,
    PrivacySettings,
    adaptive_count_std,
    gaussian_noise,
    round_noise_seed,
    seeded_numpy,
)
from fedforget.server.rounds.history_position import RecordingError
from fedforget.server.store.history_store import HistoryStore

Average = Callable[[int, list[Message]], "tuple[ArrayRecord | None, MetricRecord | None]"]
ExamplesOf = Callable[[Message], int]
PreviousMetrics = Callable[[int], "dict[str, float] | None"]


def settle_privacy(store: HistoryStore, settings: PrivacySettings | None) -> int | None:
    """Check ``settings`` against the history's, record them in a new history; the noise secret (central DP).

    A history keeps one privacy regime from its first round: rounds trained
    without noise before DP was switched on would make every ε reported a lie,
    and a DP history continued without noise would silently lose its guarantee.
    """
    stored = store.get_meta(PRIVACY_META)
    if settings is None:
        if stored is not None:
            raise RecordingError(
                f"the history in {store.path} was trained with differential privacy ({stored}); continue it with "
                "the same settings (simulate --dp ... / RecordingFedAvg(privacy=...)), not without"
            )
        return None
    if stored is not None and PrivacySettings.from_json(stored) != settings:  # type: ignore[arg-type]
        raise RecordingError(
            f"the history in {store.path} was trained with DP settings {stored}, not {settings.to_json()}: "
            "continue it with the same mechanism, noise multiplier, clipping norm and delta"
        )
    if stored is None:
        if any(store.reader(t.id).last_round() > 0 for t in store.trajectories()):
            raise RecordingError(
                f"the history in {store.path} already holds rounds trained without differential privacy; "
                "DP must be on from the first round for its epsilon to mean anything: start a new history"
            )
        store.set_meta(PRIVACY_META, settings.to_json())
    if not settings.central:
        return None
    secret = store.get_meta(NOISE_SEED_META)
    if secret is None:
        secret = secrets.randbits(63)
        store.set_meta(NOISE_SEED_META, secret)
    return int(secret)  # type: ignore[call-overload]


class _Averaging(Strategy):
    """The inner strategy a Flower DP wrapper expects: here only the recording strategy's FedAvg average."""

    def __init__(self, average: Average) -> None:
        self._average = average

    def aggregate_train(self, server_round: int, replies):  # type: ignore[no-untyped-def,override]
        return self._average(server_round, list(replies))

    def _unused(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        raise NotImplementedError("the DP wrapper only averages here; the recording strategy does the rest")

    configure_train = configure_evaluate = aggregate_evaluate = summary = _unused  # type: ignore[assignment]


def largest_share(replies: list[Message], examples_of: ExamplesOf) -> float:
    """The largest w_k = n_k/Σn among the answered replies: the weight FedAvg gives its heaviest client."""
    counts = [examples_of(m) for m in replies if not m.has_error()]
    return max(counts) / sum(counts)


class _NoiseForLargestShare:
    """A Flower DP wrapper's noise draw, with std z·C·max_k w_k instead of z·C/n (see the module's docstring).

    Mixed in before the Flower wrapper, whose ``_add_noise_to_aggregated_arrays``
    it replaces. The draw is :func:`fedforget.privacy.gaussian_noise`, Flower's
    own sequence from numpy's global generator, which is what lets
    :func:`fedforget.privacy.recorded_noise` regenerate it.
    """

    noise_multiplier: float
    largest_share: float | None = None
    """max_k n_k/Σn of the round being aggregated; set before each ``aggregate_train``."""
    round_noise_std: float | None = None
    """The std of the Gaussian noise the last aggregated round added to each coordinate of the average."""

    def _noise_clipping_norm(self) -> float:
        raise NotImplementedError

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        if self.largest_share is None:
            raise RuntimeError("the round's largest share must be set before its average is noised")
        nds = aggregated.to_numpy_ndarrays()
        self.round_noise_std = float(self.noise_multiplier * self._noise_clipping_norm() * self.largest_share)
        for array, noise in zip(nds, gaussian_noise(self.round_noise_std, nds), strict=True):
            array += noise
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(aggregated.keys(), nds, strict=True)})


class FixedClipping(_NoiseForLargestShare, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, its noise sized for the round's largest share."""

    def _noise_clipping_norm(self) -> float:
        return float(self.clipping_norm)


class AndrewAdaptiveClipping(_NoiseForLargestShare, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping in Andrew et al.'s order, its norm moving toward the target quantile.

    Two changes to Flower 1.42's wrapper, both in what Andrew et al. 2021
    (Algorithm 1, DP-FedAvg with adaptive clipping) do:

    - **The share.** The paper counts b_i = 1 for an update that is *not*
      clipped (‖Δ_i‖ ≤ C) and sets C ← C·exp(−η(b̃ − γ)): C falls while more
      than a γ share of the updates fits under it and rises otherwise. Flower
      counts the *clipped* updates (its norm bit is "scaled by less than 1") in
      the same formula, so C runs away from the quantile: on digits, 240
      clients whose updates were all clipped, C fell from 0.1 to 0.035 in 10
      rounds. Here the share is turned round: 1 − (clipped + noise)/n =
      (unclipped − noise)/n, the same Gaussian release of the count.
    - **The noise.** The paper noises the average with the norm C_t the
      round's updates were clipped with, then updates C for the next round.
      Flower updates C first and noises with C_{t+1}, so the round's realised
      update noise multiplier is z_Δ·C_{t+1}/C_t, not z_Δ: smaller (more ε)
      when C shrinks, larger (noise wasted) when it grows. Here the noise std
      is z_Δ·C_t/n, so every round releases the updates with exactly Flower's
      z_Δ, which composes with the count query into the z asked for.

And, as for fixed clipping, the std is sized for the round's largest share
(:class:`_NoiseForLargestShare`): z_Δ·C_t·max_k w_k, which is z_Δ·C_t/n when
the shares are equal.

    The clipping, the noised count, the norm update and the noise draw are
    Flower's own functions, drawn from numpy's global generator in Flower's
    order (count, then update noise). :attr:`round_clipping_norm` and
    :attr:`round_noise_std` are what the last round did, for the record.
    """

    round_clipping_norm: float | None = None
    """The norm the last aggregated round clipped its updates with (and noised with)."""

    def _noisy_fraction(self, count: int, total: int) -> float:
        return 1.0 - super()._noisy_fraction(count, total)

    def aggregate_train(self, server_round: int, replies):  # type: ignore[no-untyped-def,override]
        self.round_clipping_norm = float(self.clipping_norm)
        self.round_noise_std = None
        return super().aggregate_train(server_round, replies)

    def _noise_clipping_norm(self) -> float:
        if self.round_clipping_norm is None:
            raise RuntimeError("AndrewAdaptiveClipping noises only inside aggregate_train, which sets the round's norm")
        return self.round_clipping_norm


class PrivateAggregation:
    """Clip, average and noise one round's replies with Flower's server-side DP wrapper.

    Parameters
    ----------
    settings:
        The mechanism (``central-fixed`` or ``central-adaptive``), z and C.
    noise_secret:
        The run's secret (store meta), from which each round's noise seed is derived.
    average:
        The plain FedAvg average of a list of replies (the recording strategy's own).
    examples_of:
        A reply's example count, the one ``average`` weights it by (the noise is sized for the largest share).
    previous_metrics:
        The recorded metrics of a round of the current trajectory (None if there
        is none): where adaptive clipping resumes its norm after a fork or restart.
    """

    def __init__(
        self,
        settings: PrivacySettings,
        noise_secret: int,
        average: Average,
        examples_of: ExamplesOf,
        previous_metrics: PreviousMetrics,
    ) -> None:
        if not settings.central:
            raise ValueError(f"{settings.mechanism} DP adds no server-side noise; the server averages plainly")
        self.settings = settings
        self._secret = noise_secret
        self._inner = _Averaging(average)
        self._examples_of = examples_of
        self._previous_metrics = previous_metrics
        self._adaptive: AndrewAdaptiveClipping | None = None
        self._last: tuple[int, int] | None = None
        """(trajectory, round) the adaptive wrapper's clipping norm follows."""

    def aggregate(
        self, trajectory: int, server_round: int, replies: list[Message], model_sent: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, float]]:
        """The noised average of ``replies`` (clipped in place), and the round's DP facts to record."""
        answered = sum(1 for m in replies if not m.has_error())
        if answered == 0:
            return None, None, {}
        for msg in (m for m in replies if not m.has_error()):
            # Flower's clipping scales by min(1, C/norm): a NaN norm passes unclipped and poisons the model.
            if not all(np.isfinite(a).all() for record in msg.content.array_records.values() for a in record.to_numpy_ndarrays()):
                raise RecordingError(
                    f"round {server_round}: node {msg.metadata.src_node_id} returned non-finite weights (its local "
                    "training diverged); no clipping can bound that update: lower the learning rate"
                )
        with seeded_numpy(round_noise_seed(self._secret, trajectory, server_round)):
            if self.settings.mechanism == "central-fixed":
                return self._fixed(server_round, replies, model_sent, answered)
            return self._adaptive_round(trajectory, server_round, replies, model_sent, answered)

    def _fixed(
        self, server_round: int, replies: list[Message], model_sent: ArrayRecord, answered: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, float]]:
        z, clip = self.settings.noise_multiplier, self.settings.clipping_norm
        wrapper = FixedClipping(self._inner, z, clip, answered)
        wrapper.current_arrays = model_sent
        wrapper.largest_share = largest_share(replies, self._examples_of)
        arrays, metrics = wrapper.aggregate_train(server_round, replies)
        if arrays is None or wrapper.round_noise_std is None:  # Flower refused the replies: nothing to record
            return None, metrics, {}
        return arrays, metrics, {NOISE_STD: wrapper.round_noise_std, CLIPPING_NORM: clip}

    def _adaptive_round(
        self, trajectory: int, server_round: int, replies: list[Message], model_sent: ArrayRecord, answered: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, float]]:
        wrapper = self._adaptive_wrapper(trajectory, server_round, answered)
        wrapper.current_arrays = model_sent
        wrapper.largest_share = largest_share(replies, self._examples_of)
        arrays, metrics = wrapper.aggregate_train(server_round, replies)
        self._last = (trajectory, server_round)
        if arrays is None or wrapper.round_noise_std is None:  # Flower refused the replies: nothing to record
            return None, metrics, {}
        # The std and norm the round used (clip and noise with C_t); the norm the next round starts from.
        return arrays, metrics, {
            NOISE_STD: wrapper.round_noise_std, CLIPPING_NORM: wrapper.round_clipping_norm,
            COUNT_STD: float(wrapper.clipped_count_stddev), NEXT_CLIPPING_NORM: float(wrapper.clipping_norm),
        }

    def _adaptive_wrapper(
        self, trajectory: int, server_round: int, answered: int
    ) -> AndrewAdaptiveClipping:
        """The wrapper for this round: the running one, or a new one starting from the recorded norm.

        The clipped count's noise std is :func:`fedforget.privacy.adaptive_count_std`.
        """
        current = self._adaptive
        if current is not None and self._last == (trajectory, server_round - 1) and current.num_sampled_clients == answered:
            return current
        if current is not None and self._last == (trajectory, server_round - 1):
            norm = float(current.clipping_norm)
        else:
            before = self._previous_metrics(server_round - 1) if server_round > 1 else None
            norm = float(before[NEXT_CLIPPING_NORM]) if before and NEXT_CLIPPING_NORM in before else self.settings.clipping_norm
        z = self.settings.noise_multiplier
        self._adaptive = AndrewAdaptiveClipping(
            self._inner, z, answered, initial_clipping_norm=norm, target_clipped_quantile=ADAPTIVE_TARGET_QUANTILE,
            clip_norm_lr=ADAPTIVE_CLIP_LR, clipped_count_stddev=adaptive_count_std(answered, z),
        )
        return self._adaptive
