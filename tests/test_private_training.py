"""Differentially private training: the history, the ledger and the accountant tell the truth about it.

One small digits federation (3 clients, 3 rounds, a fifth of digits, central
DP with fixed clipping, client 1 withdrawn before round 3 and retrained away)
on the in-process grid, shared by the module. A client mod records the sha256 model hash of every model a
ClientApp receives, so the ledger can be checked against what the clients
really got, not against what the server thinks it sent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flower_fixtures import initial_model, local_federation
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_adaptive_noise_params, compute_stdv

from fedforget import wire
from fedforget.arrays import model_hash
from fedforget.client.certificate_check import verify_certificate
from fedforget.privacy import (
    ADAPTIVE_CLIP_LR,
    CLIPPING_NORM,
    COUNT_STD,
    NEXT_CLIPPING_NORM,
    NOISE_SEED_META,
    NOISE_STD,
    PrivacySettings,
    adaptive_count_std,
    client_noise_multiplier,
    epsilon_spent,
    noise_multiplier_for,
    planned_noise_multiplier,
    round_noise_seed,
    seeded_numpy,
)
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.ledger.log import Ledger
from fedforget.server.rounds.history_position import RecordingError
from fedforget.server.rounds.private_aggregation import PrivateAggregation, settle_privacy
from fedforget.server.rounds.privacy_accounting import privacy_account, withdrawn_privacy
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.simulations.config import ConfigError, SimulationConfig
from fedforget.simulations.withdrawing_clients import FederationPaths, prepare_federation
from fedforget.strategies.registry import StrategyChoice

SETTINGS = PrivacySettings("central-fixed", noise_multiplier=1.0, clipping_norm=0.5)
FRACTION = 0.2
"""These tests check what is recorded and accounted, not accuracy: a fifth of digits keeps them fast."""


class ReceivedModels:
    """A client mod: the hash of the model in every training message a ClientApp receives, by server round."""

    def __init__(self) -> None:
        self.by_round: dict[int, set[str]] = {}

    def __call__(self, msg, context, call_next):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train":
            config = msg.content.config_records[wire.CONFIG_KEY]
            arrays = wire.arrays_from_record(msg.content[wire.ARRAYS_KEY])
            self.by_round.setdefault(int(config[wire.SERVER_ROUND]), set()).add(model_hash(arrays))
        return call_next(msg, context)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    paths = FederationPaths(root)
    prepare_federation(paths, [])
    received = ReceivedModels()
    fed = local_federation(
        root / "store", clients=3, rounds=3, withdrawals=[Withdrawal("1", 3)], privacy=SETTINGS, mods=[received],
        train_fraction=FRACTION,
        accountability=Accountability(
            ledger_path=paths.ledger, server_key=paths.server_key, certificates_dir=paths.certificates,
            federation_id="test-federation",
        ),
    )
    outcome = fed.run.execute(initial_model())
    fed.strategy.flush()
    return fed, outcome, received, paths


def _flat(arrays) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in arrays.values()])


def test_the_ledger_hashes_are_the_models_the_clients_received(dp_run):
    fed, _, received, paths = dp_run
    with Ledger.open(paths.ledger, readonly=True) as ledger:
        rounds = [e.body for e in ledger.entries() if e.kind == "round"]
    ledger_hash = {(r["trajectory"], r["round"]): r["model_hash"] for r in rounds}
    for server_round, hashes in sorted(received.by_round.items()):
        if server_round == 1:
            continue
        trained_then = {r["trajectory"] for r in rounds if r["round"] == server_round and r["participants"]}
        assert hashes == {ledger_hash[(t, server_round - 1)] for t in trained_then}, server_round
    assert set(received.by_round) == {1, 2, 3} and len(received.by_round[2]) == 2  # the original and the retrain


def test_the_stored_updates_are_the_clipped_ones_and_each_rounds_noise_comes_from_the_recorded_seed(dp_run):
    fed, _, _, _ = dp_run
    store = fed.store
    secret = int(store.get_meta(NOISE_SEED_META))
    retrain = 2  # client 1's updates in trajectory 1 were crypto-shredded; the retrain's are all readable
    for server_round in (1, 2, 3):
        view = next(store.reader(retrain).rounds(server_round, server_round))
        step = sum(p.weight * _flat(u) for p, u in view.updates())
        for _, update in view.updates():
            assert np.linalg.norm(_flat(update)) <= SETTINGS.clipping_norm * (1 + 1e-5)
        residual = _flat(view.model_after()) - _flat(view.model_before()) - step
        assert view.metrics[NOISE_STD] == pytest.approx(1.0 * 0.5 * max(p.weight for p in view.participants))

        def noise(trajectory: int) -> np.ndarray:
            zeros = [np.zeros_like(np.asarray(v)) for v in view.model_after().values()]
            with seeded_numpy(round_noise_seed(secret, trajectory, server_round)):
                add_gaussian_noise_inplace(zeros, view.metrics[NOISE_STD])
            return np.concatenate([z.astype(np.float64).ravel() for z in zeros])

        np.testing.assert_allclose(residual, noise(retrain), atol=1e-4)
        # The retrain drew fresh noise: the original trajectory's draw for this round does not explain it.
        assert np.abs(residual - noise(1)).max() > 0.1


def test_each_client_is_accounted_for_every_noised_round_it_was_in(dp_run):
    fed, _, _, _ = dp_run
    account = privacy_account(fed.store, SETTINGS)
    assert account.noised_rounds == 2 + 3 and account.rounds_without_noise == 0
    by_client: dict[str, list[float]] = {}
    for trajectory, first in ((1, 1), (2, 1)):
        for view in fed.store.reader(trajectory).rounds(first):
            charged = {p.client_id: view.metrics[NOISE_STD] / (p.weight * view.metrics[CLIPPING_NORM]) for p in view.participants}
            assert min(charged.values()) == pytest.approx(SETTINGS.noise_multiplier)  # the largest share: exactly z
            for client, multiplier in charged.items():
                by_client.setdefault(client, []).append(multiplier)
    assert len(by_client["1"]) == 2 and len(by_client["0"]) == 5
    for client, multipliers in by_client.items():
        assert account.epsilon_by_client[client] == pytest.approx(epsilon_spent(multipliers, SETTINGS.delta))
    assert account.epsilon == max(account.epsilon_by_client.values()) > account.epsilon_by_client["1"]


def test_the_ledger_and_the_certificate_state_the_dp_and_the_withdrawn_clients_epsilon(dp_run):
    fed, outcome, _, paths = dp_run
    expected = privacy_account(fed.store, SETTINGS).epsilon_by_client["1"]
    with Ledger.open(paths.ledger, readonly=True) as ledger:
        (unlearning,) = [e.body for e in ledger.entries() if e.kind == "unlearning"]
    assert unlearning["privacy"]["mechanism"] == "central-fixed"
    assert unlearning["privacy"]["clipping_norm"] == 0.5 and unlearning["privacy"]["noise_multiplier"] == 1.0
    assert unlearning["privacy"]["epsilon"] == {"1": pytest.approx(expected)}
    certificate = outcome.unlearning[0]["certificates"]["1"]
    report = verify_certificate(certificate, paths.server_public_key)
    assert report.valid
    assert report.summary["privacy"]["epsilon"] == pytest.approx(expected)
    assert any("differential privacy" in line and f"{expected:.4g}" in line for line in report.attests)


NOT_A_DP_RELEASE = "not a differentially private release"


def test_a_retrains_certificate_does_not_deny_its_model_the_epsilon(dp_run):
    """A retrain's every round is noised afresh: its model is a DP release, and its certificate says nothing else."""
    _, outcome, _, paths = dp_run
    report = verify_certificate(outcome.unlearning[0]["certificates"]["1"], paths.server_public_key)
    assert report.summary["privacy"]["unlearned_model_noised"] is True
    assert not any(NOT_A_DP_RELEASE in line for line in report.does_not_attest)


def test_an_approximate_unlearnings_certificate_says_its_model_is_covered_by_no_epsilon(tmp_path):
    """subtract computes its model from recorded updates and averages its stages' training without noise."""
    paths = FederationPaths(tmp_path)
    prepare_federation(paths, [])
    fed = local_federation(
        tmp_path / "store", clients=3, rounds=3, withdrawals=[Withdrawal("1", 3)], privacy=SETTINGS,
        train_fraction=FRACTION, unlearner=StrategyChoice("subtract", {"recovery-rounds": 1}).build(),
        accountability=Accountability(
            ledger_path=paths.ledger, server_key=paths.server_key, certificates_dir=paths.certificates,
            federation_id="test-federation",
        ),
    )
    outcome = fed.run.execute(initial_model())
    report = verify_certificate(outcome.unlearning[0]["certificates"]["1"], paths.server_public_key)
    assert report.valid
    assert report.summary["privacy"]["unlearned_model_noised"] is False
    assert any(NOT_A_DP_RELEASE in line for line in report.does_not_attest)
    with Ledger.open(paths.ledger, readonly=True) as ledger:
        (unlearning,) = [e.body for e in ledger.entries() if e.kind == "unlearning"]
    assert unlearning["privacy"]["unlearned_model_noised"] is False


STRATEGIES = ("retrain", "calibrated", "replay", "subtract", "fedrecovery")


@pytest.fixture(scope="module")
def unlearned_every_way(tmp_path_factory):
    """One DP history (2 clients, 2 rounds), then client 1 unlearned from it by every strategy, each into its own trajectory.

    As ``fedforget bench unlearning`` does: one training shared by every
    strategy, so the strategies are compared on the same noised history.
    """
    fed = local_federation(
        tmp_path_factory.mktemp("every-way") / "store", clients=2, rounds=2, privacy=SETTINGS, train_fraction=FRACTION
    )
    fed.run.execute(initial_model())
    fed.strategy.flush()
    source = fed.store.current_trajectory()
    fed.strategy.exclude(["1"])
    trajectories: dict[str, int] = {}
    for strategy in STRATEGIES:
        _, _, trajectories[strategy] = fed.run.run_unlearner(StrategyChoice(strategy).build(), ["1"], 2, source)
        fed.strategy.flush()
    return fed, source, trajectories


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_unlearns_a_dp_history(unlearned_every_way, strategy):
    fed, source, trajectories = unlearned_every_way
    trajectory = trajectories[strategy]
    (own,) = [t for t in fed.store.trajectories() if t.id == trajectory]
    assert own.parent == source
    new = fed.store.reader(trajectory)
    assert all("1" not in {p.client_id for p in v.participants} for v in new.rounds(own.base_version + 1))
    assert np.isfinite(_flat(new.model(2))).all()
    account = privacy_account(fed.store, SETTINGS, trajectories={source, trajectory})
    assert account.epsilon_by_client["1"] > 0
    # Rounds the strategy computed itself are not DP releases, and the account says so.
    computed = [v for v in new.rounds(own.base_version + 1) if NOISE_STD not in v.metrics]
    assert account.rounds_without_noise == len(computed)
    if strategy == "retrain":  # retraining is a fresh DP release of the staying client, noised every round
        assert not computed and account.noised_rounds == 2 + 2
    noised = withdrawn_privacy(fed.store, ["1"], trajectory)["unlearned_model_noised"]  # type: ignore[index]
    assert noised is (strategy == "retrain")


def test_a_dp_rounds_noise_is_drawn_again_and_never_read_as_the_withdrawn_clients_share(unlearned_every_way):
    """Every noised round's noise, regenerated from the secret, is exactly what its model carries beyond the
    clipped updates' average, also in a fork's copies of its parent's rounds (drawn under the parent's id); and
    the withdrawn client's share of a round is its clipped contribution alone, not that plus the round's noise."""
    from fedforget.strategies.toolkit import residual

    fed, source, _ = unlearned_every_way
    copied_rounds_checked = 0
    for trajectory in fed.store.trajectories():
        for view in fed.store.reader(trajectory.id).rounds():
            if NOISE_STD not in view.metrics:
                assert view.noise() is None  # computed by a strategy: nothing to take out
                continue
            step = _flat(view.model_after()) - _flat(view.model_before())
            clipped_average = sum(p.weight * _flat(u) for p, u in view.updates())
            np.testing.assert_allclose(_flat(view.noise()), step - clipped_average, atol=1e-5)
            assert np.abs(step - clipped_average).max() > 0.01  # there is noise to find
            copied_rounds_checked += trajectory.parent is not None and view.round <= trajectory.base_version
    assert copied_rounds_checked > 0
    for view in fed.store.reader(source).rounds():
        updates = {p.client_id: (p.weight, _flat(u)) for p, u in view.updates()}
        staying = [(w, u) for client, (w, u) in updates.items() if client != "1"]
        without = sum(w * u for w, u in staying) / sum(w for w, _ in staying)
        expected = sum(w * u for w, u in updates.values()) - without
        np.testing.assert_allclose(_flat(residual(view, frozenset({"1"}))), expected, atol=1e-5)


def test_a_local_dp_reply_without_noise_is_refused(tmp_path):
    from local_grid import LocalGrid
    import plain_client

    from fedforget.server.rounds.loop import FederatedRun, RunSettings
    from fedforget.server.rounds.recording import RecordingFedAvg
    from fedforget.strategies.retrain import Retrain

    from fedforget.client.app import model_arrays

    initial = model_arrays(plain_client.Net())
    store = HistoryStore.create(tmp_path / "s", federation_id="f", model_spec=ModelSpec.from_arrays(initial))
    strategy = RecordingFedAvg(
        store, privacy=PrivacySettings("local", 1.0, 1.0), fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1
    )
    run = FederatedRun(
        LocalGrid(plain_client.app, 2), store, strategy, Retrain(),
        RunSettings(num_rounds=1, train_config={"lr": 0.1}, expected_clients=2),
    )
    with pytest.raises(RecordingError, match="without local DP noise"):
        run.execute(initial)


def test_a_local_dp_history_records_the_noised_replies(tmp_path):
    fed = local_federation(tmp_path / "store", clients=2, rounds=1, privacy=PrivacySettings("local", 1.0, 0.5),
                           train_fraction=FRACTION)
    fed.run.execute(initial_model())
    fed.strategy.flush()
    view = next(fed.store.reader().rounds())
    assert view.metrics[NOISE_STD] == 0.5 and fed.store.get_meta(NOISE_SEED_META) is None
    for _, update in view.updates():  # clipped to 0.5, then N(0, 0.5²) on every coordinate
        assert np.linalg.norm(_flat(update)) > 10 * 0.5


def test_a_history_keeps_one_privacy_regime(tmp_path):
    store = HistoryStore.create(tmp_path / "s", federation_id="f", model_spec=ModelSpec.from_arrays(initial_model()))
    secret = settle_privacy(store, SETTINGS)
    assert settle_privacy(store, SETTINGS) == secret
    with pytest.raises(RecordingError, match="with differential privacy"):
        settle_privacy(store, None)
    with pytest.raises(RecordingError, match="not"):
        settle_privacy(store, PrivacySettings("central-fixed", 2.0, 0.5))


def test_the_noise_multiplier_derived_from_an_epsilon_target_meets_it():
    z = noise_multiplier_for(8.0, 1e-5, 20)
    assert epsilon_spent([z] * 20, 1e-5) <= 8.0 < epsilon_spent([0.97 * z] * 20, 1e-5)


def test_a_target_epsilon_plans_a_z_the_accountant_charges_at_most_that_epsilon_for():
    """Every mechanism gets the calibrated z; central-adaptive's rounds, recorded as the wrapper noises them
    (with the norm the round clipped with) and composed with the count query, cost exactly that z."""
    config = SimulationConfig(clients=1000, rounds=10, dp="central-fixed", clipping_norm=0.1, target_epsilon=8.0)
    config.validate()
    fixed = config.privacy().noise_multiplier  # type: ignore[union-attr]
    assert epsilon_spent([fixed] * 10, 1e-5) <= 8.0 < epsilon_spent([0.97 * fixed] * 10, 1e-5)
    adaptive = SimulationConfig(clients=1000, rounds=10, dp="central-adaptive", clipping_norm=0.1, target_epsilon=8.0)
    z = adaptive.privacy().noise_multiplier  # type: ignore[union-attr]
    assert z == fixed == planned_noise_multiplier(8.0, 1e-5, 10)
    for n in (10, 1000):
        count_std, z_updates = compute_adaptive_noise_params(z, n, adaptive_count_std(n, z))
        norms = [0.1 * 1.3**t for t in range(10)]  # whatever the norm does between rounds
        rounds = [{NOISE_STD: compute_stdv(z_updates, c, n), CLIPPING_NORM: c, COUNT_STD: count_std} for c in norms]
        spent = epsilon_spent([client_noise_multiplier(m, 1.0 / n) for m in rounds], 1e-5)
        assert 7.99 < spent <= 8.0 + 1e-6
    with pytest.raises(ConfigError, match="not both"):
        SimulationConfig(dp="local", noise_multiplier=1.0, clipping_norm=0.1, target_epsilon=8.0).validate()
    with pytest.raises(ConfigError, match="fraction-train"):
        SimulationConfig(dp="central-fixed", clipping_norm=0.1, target_epsilon=8.0, fraction_train=0.5).validate()


def test_adaptive_clipping_noises_with_the_norm_the_round_clipped_with_and_records_it():
    """Andrew et al.'s order: round t clips and noises with C_t, then sets C_{t+1}; so the recorded std is
    z_Δ·C_t/n, the noise in the released model has that std, and the accountant charges exactly z per round."""
    n, z, start, secret = 4, 1.0, 0.5, 7
    settings = PrivacySettings("central-adaptive", noise_multiplier=z, clipping_norm=start)

    def mean(server_round, replies):  # type: ignore[no-untyped-def]
        stacked = [r.content.array_records["arrays"].to_numpy_ndarrays()[0] for r in replies]
        return ArrayRecord({"w": Array(np.mean(stacked, axis=0))}), MetricRecord({})

    rng = np.random.default_rng(0)
    model = ArrayRecord({"w": Array(np.zeros(2000, np.float32))})
    aggregation = PrivateAggregation(settings, secret, mean, lambda reply: 1, lambda server_round: None)
    _, z_updates = compute_adaptive_noise_params(z, n, adaptive_count_std(n, z))
    clip = start
    for server_round in (1, 2):
        directions = rng.normal(size=(n, 2000))
        updates = [(k + 1.0) * d / np.linalg.norm(d) for k, d in enumerate(directions)]  # norms 1..4: all clipped
        replies = [
            Message(RecordDict({"arrays": ArrayRecord({"w": Array(u.astype(np.float32))})}), dst_node_id=k + 1, message_type="train")
            for k, u in enumerate(updates)
        ]
        arrays, _, facts = aggregation.aggregate(1, server_round, replies, model)
        assert facts[CLIPPING_NORM] == pytest.approx(clip)
        assert facts[NEXT_CLIPPING_NORM] > 1.05 * clip  # every update clipped: C grows, so the two norms differ
        assert facts[NOISE_STD] == pytest.approx(compute_stdv(z_updates, clip, n))
        clipped_mean = np.mean([u * min(1.0, clip / np.linalg.norm(u)) for u in updates], axis=0)
        residual = arrays.to_numpy_ndarrays()[0].astype(np.float64) - clipped_mean
        with seeded_numpy(round_noise_seed(secret, 1, server_round)):
            np.random.normal()  # Flower's draw order: the count's noise, then the update noise
            noise = [np.zeros(2000)]
            add_gaussian_noise_inplace(noise, facts[NOISE_STD])
        np.testing.assert_allclose(residual, noise[0], atol=1e-5)
        assert client_noise_multiplier(facts, 1.0 / n) == pytest.approx(z)
        clip = facts[NEXT_CLIPPING_NORM]


@pytest.mark.parametrize("mechanism", ["central-fixed", "central-adaptive"])
def test_unequal_shares_get_noise_sized_for_the_largest_so_every_client_spends_at_most_the_target(mechanism):
    """FedAvg weights a clipped update by n_k/Σn, so the largest client's sensitivity is max_k w_k·C: the noise
    must be z·C·max_k w_k (Flower's z·C/n would charge that client more than z), and that std must be what the
    released model carries and what the accountant reads; the smaller clients are then charged less than z."""
    examples = [1, 1, 2, 6]  # shares 0.1, 0.1, 0.2, 0.6: Flower's 1/n = 0.25 would undersize the noise 2.4 times
    n, z, clip, secret = len(examples), 1.5, 0.5, 11
    settings = PrivacySettings(mechanism, noise_multiplier=z, clipping_norm=clip)
    by_node = dict(enumerate(examples, start=1))

    def weighted_mean(server_round, replies):  # type: ignore[no-untyped-def]
        stacked = [r.content.array_records["arrays"].to_numpy_ndarrays()[0] * by_node[r.metadata.dst_node_id] for r in replies]
        return ArrayRecord({"w": Array(np.sum(stacked, axis=0) / sum(examples))}), MetricRecord({})

    aggregation = PrivateAggregation(settings, secret, weighted_mean, lambda reply: by_node[reply.metadata.dst_node_id], lambda r: None)
    rng = np.random.default_rng(1)
    updates = [3.0 * d / np.linalg.norm(d) for d in rng.normal(size=(n, 4000))]  # every update clipped to C
    replies = [
        Message(RecordDict({"arrays": ArrayRecord({"w": Array(u.astype(np.float32))})}), dst_node_id=k, message_type="train")
        for k, u in enumerate(updates, start=1)
    ]
    arrays, _, facts = aggregation.aggregate(1, 1, replies, ArrayRecord({"w": Array(np.zeros(4000, np.float32))}))
    z_updates = z if mechanism == "central-fixed" else compute_adaptive_noise_params(z, n, adaptive_count_std(n, z))[1]
    assert facts[NOISE_STD] == pytest.approx(z_updates * clip * max(examples) / sum(examples))
    clipped_mean = np.sum([u * clip / np.linalg.norm(u) * w for u, w in zip(updates, examples)], axis=0) / sum(examples)
    residual = arrays.to_numpy_ndarrays()[0].astype(np.float64) - clipped_mean
    assert residual.std() == pytest.approx(facts[NOISE_STD], rel=0.05)  # the model carries the recorded std
    charged = [client_noise_multiplier(facts, w / sum(examples)) for w in examples]
    assert charged[-1] == pytest.approx(z)  # the largest share: exactly the z asked for
    assert all(c > z for c in charged[:-1])  # the others: more noise per unit of their sensitivity


def test_adaptive_clipping_raises_the_norm_when_updates_are_clipped_and_lowers_it_when_they_fit():
    """Andrew et al.'s direction (Flower 1.42's own update moves the other way); count noise off to see it."""
    from fedforget.server.rounds.private_aggregation import AndrewAdaptiveClipping

    wrapper = AndrewAdaptiveClipping(
        object(), 0.0, 4, initial_clipping_norm=1.0, clip_norm_lr=ADAPTIVE_CLIP_LR, clipped_count_stddev=0.0  # type: ignore[arg-type]
    )
    wrapper._geometric_update(wrapper._noisy_fraction(4, 4))  # every update clipped
    assert wrapper.clipping_norm == pytest.approx(math.exp(ADAPTIVE_CLIP_LR * 0.5))
    wrapper._geometric_update(wrapper._noisy_fraction(0, 4))  # none clipped
    assert wrapper.clipping_norm == pytest.approx(1.0)
