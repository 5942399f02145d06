"""FedEraser (strategies/calibrated.py) on a deterministic toy federation over a real history store.

The toy clients fit a linear least-squares model with full-batch gradient
descent, so local training is a deterministic function of (client, model,
epochs) and a test can recompute exactly what a client would send.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from toy_federation import (
    LocalCall,
    ToyFederation,
    assert_models_close,
    flat,
    moved,
    record_history,
    weighted_step,
)

from fedforget.arrays import Arrays
from fedforget.server.store.history_store import HistoryReader, HistoryStore
from fedforget.strategies.base import UnlearningRequest
from fedforget.strategies.calibrated import Calibrated, CalibratedSettings, calibrate, update_norms
from fedforget.strategies.settings import SettingsError, UnlearningContext

D_IN, D_OUT = 5, 3
STEPS_PER_EPOCH = 3
LR = 0.05
LOCAL_EPOCHS = 2.0
SIZES = {"c0": 40, "c1": 25, "c2": 60, "c3": 15}


class ToyClient:
    """Linear regression Y ≈ X Wᵀ + b on its own non-IID data, trained by full-batch gradient descent."""

    def __init__(self, seed: int, n: int) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.x = rng.standard_normal((n, D_IN))
        true_w = rng.standard_normal((D_OUT, D_IN)) * (1 + seed)  # a different target per client
        self.y = self.x @ true_w.T + rng.standard_normal(D_OUT) + 0.1 * rng.standard_normal((n, D_OUT))

    def train(self, model: Arrays, epochs: float) -> Arrays:
        w0 = model["weight"].astype(np.float64)
        b0 = model["bias"].astype(np.float64)
        w, b = w0.copy(), b0.copy()
        for _ in range(int(round(epochs * STEPS_PER_EPOCH))):
            residual = self.x @ w.T + b - self.y
            w -= LR * residual.T @ self.x / self.n
            b -= LR * residual.mean(axis=0)
        return {"weight": (w - w0).astype(np.float32), "bias": (b - b0).astype(np.float32)}


def make_clients() -> dict[str, ToyClient]:
    return {cid: ToyClient(i, n) for i, (cid, n) in enumerate(SIZES.items())}


def initial_model() -> Arrays:
    rng = np.random.default_rng(123)
    return {
        "weight": (0.1 * rng.standard_normal((D_OUT, D_IN))).astype(np.float32),
        "bias": np.zeros(D_OUT, dtype=np.float32),
    }


Schedule = Callable[[int], list[str]]


def build_history(
    path: Path, clients: dict[str, ToyClient], *, rounds: int, retention: int, schedule: Schedule | None = None
) -> HistoryStore:
    """Run ``rounds`` FedAvg rounds and record them in a new store with retention interval Δt = ``retention``."""
    plan = [schedule(t) if schedule else sorted(clients) for t in range(1, rounds + 1)]
    return record_history(
        path, initial_model(), plan, SIZES, lambda t, c, model: clients[c].train(model, LOCAL_EPOCHS),
        retention_interval=retention,
    ).store


def toy_federation(
    store: HistoryStore, clients: dict[str, ToyClient], withdrawn: set[str], offline: set[str] = frozenset()
) -> ToyFederation:
    """The clients train as they did while the history was recorded; withdrawn and offline ones never answer."""
    return ToyFederation(
        store, SIZES, lambda c, model, epochs, _: clients[c].train(model, epochs),
        withdrawn=sorted(withdrawn), offline=sorted(offline), round_epochs=LOCAL_EPOCHS,
    )


def fed_eraser(
    interval: int | None = None, ratio: float = 0.5, norm: str = "layer", *, retention: int = 1
) -> Calibrated:
    """FedEraser with Δt = ``interval`` (None: the history's ``retention``), r and the norm, E = LOCAL_EPOCHS."""
    return Calibrated(
        CalibratedSettings(calibration_interval=interval, calibration_ratio=ratio, calibration_norm=norm),
        UnlearningContext(local_epochs=LOCAL_EPOCHS, retention_interval=retention),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(
    tmp_path: Path,
    *,
    rounds: int,
    retention: int,
    withdraw: set[str],
    strategy: Calibrated,
    schedule: Schedule | None = None,
    offline: set[str] = frozenset(),
):
    clients = make_clients()
    store = build_history(tmp_path / "store", clients, rounds=rounds, retention=retention, schedule=schedule)
    old = store.reader()
    federation = toy_federation(store, clients, withdraw, offline)
    request = UnlearningRequest(clients=frozenset(withdraw), completed_rounds=rounds)
    outcome = strategy.run(request, old, federation)
    return store, old, store.reader(), federation, outcome, clients


# --------------------------------------------------------------------------- 1. exactness at r = 1, Δt = 1


@pytest.mark.parametrize("norm", ["layer", "global"])
def test_calibrated_updates_have_retrain_direction_and_stored_norm(tmp_path: Path, norm: str) -> None:
    rounds = 5
    strategy = fed_eraser(1, ratio=1.0, norm=norm)
    store, old, new, federation, outcome, clients = run(
        tmp_path, rounds=rounds, retention=1, withdraw={"c2"}, strategy=strategy
    )
    with store:
        remaining = ["c0", "c1", "c3"]
        assert outcome.base_version == 0
        # Each calibration asks the round's own participants with a stored update, without c2.
        assert federation.local_calls == [LocalCall(t, LOCAL_EPOCHS, tuple(remaining)) for t in range(2, rounds + 1)]
        assert outcome.rounds_replayed == rounds - 1
        # Metered on the federation handle: one round trip per calibrated round, r·E epochs per answering client.
        assert outcome.round_trips == rounds - 1
        assert outcome.client_epochs == pytest.approx((rounds - 1) * len(remaining) * LOCAL_EPOCHS)
        norms_differ = False
        for new_view, old_view in zip(new.rounds(1, rounds), old.rounds(1, rounds), strict=True):
            t = new_view.round
            assert [p.client_id for p in new_view.participants] == remaining
            before = new_view.model_before()
            recorded = {p.client_id: new_view.update(p.client_id) for p in new_view.participants}
            for client_id in remaining:
                retrain = clients[client_id].train(before, LOCAL_EPOCHS)  # exact retrain's update from M̃
                stored = old_view.update(client_id)
                got = recorded[client_id]
                if t == 1:  # reused as stored; from model 0 that *is* the retrain update
                    assert_models_close(got, stored, rtol=0, atol=0)
                    assert_models_close(got, retrain)
                    continue
                if norm == "layer":
                    for name in got:
                        assert cosine(got[name], retrain[name]) == pytest.approx(1.0, abs=1e-6)
                        assert np.linalg.norm(got[name]) == pytest.approx(np.linalg.norm(stored[name]), rel=1e-5)
                        norms_differ |= not math.isclose(
                            np.linalg.norm(retrain[name]), np.linalg.norm(stored[name]), rel_tol=1e-3
                        )
                else:
                    assert cosine(flat(got), flat(retrain)) == pytest.approx(1.0, abs=1e-6)
                    assert np.linalg.norm(flat(got)) == pytest.approx(np.linalg.norm(flat(stored)), rel=1e-5)
                    norms_differ |= not math.isclose(
                        np.linalg.norm(flat(retrain)), np.linalg.norm(flat(stored)), rel_tol=1e-3
                    )
            # M̃ moves by the FedAvg of exactly the recorded updates (weights over the remaining clients).
            total = sum(SIZES[c] for c in remaining)
            expected = moved(before, weighted_step(recorded, {c: SIZES[c] / total for c in remaining}))
            assert_models_close(new_view.model_after(), expected)
        assert norms_differ, "toy too easy: the rescaling never changed a length"
        assert_models_close(outcome.model, new.model(rounds), rtol=0, atol=0)


# --------------------------------------------------------------------------- 2. the norm scaling itself


def test_calibrate_scales_per_layer_or_globally() -> None:
    stored = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([0.0, 0.0, 1.0], np.float32)}
    fresh = {"a": np.array([2.0, 0.0], np.float32), "b": np.array([0.0, -1.0, 0.0], np.float32)}

    layer = calibrate(stored, fresh, "layer")
    np.testing.assert_allclose(layer["a"], [5.0, 0.0])  # ‖a‖ = 5, direction (1, 0)
    np.testing.assert_allclose(layer["b"], [0.0, -1.0, 0.0])  # ‖b‖ = 1, direction (0, -1, 0)

    glob = calibrate(stored, fresh, "global")
    scale = math.sqrt(26.0) / math.sqrt(5.0)  # ‖stored‖ = √(25+1), ‖fresh‖ = √(4+1)
    np.testing.assert_allclose(glob["a"], [2.0 * scale, 0.0], rtol=1e-6)
    np.testing.assert_allclose(glob["b"], [0.0, -scale, 0.0], rtol=1e-6)
    assert np.linalg.norm(flat(glob)) == pytest.approx(math.sqrt(26.0), rel=1e-6)
    # The two differ: global keeps the ratio between arrays, layer imposes the stored one.
    assert not np.allclose(flat(layer), flat(glob))
    assert update_norms(stored, "layer") == pytest.approx({"a": 5.0, "b": 1.0})
    assert update_norms(stored, "global") == pytest.approx({"": math.sqrt(26.0)})
    for out in (layer, glob):
        assert all(out[k].dtype == np.float32 for k in out)


def test_calibrate_guards_zero_direction_and_leaves_integer_arrays() -> None:
    stored = {
        "w": np.array([3.0, 4.0], np.float32),
        "still": np.array([1.0, 1.0], np.float32),
        "count": np.array(7, np.int64),
    }
    fresh = {"w": np.array([0.0, 1.0], np.float32), "still": np.zeros(2, np.float32), "count": np.array(2, np.int64)}
    with np.errstate(all="raise"):
        layer = calibrate(stored, fresh, "layer")
        glob = calibrate(stored, fresh, "global")
        both_zero = calibrate(stored, {k: np.zeros_like(v) for k, v in fresh.items()}, "global")
    np.testing.assert_allclose(layer["w"], [0.0, 5.0])
    np.testing.assert_array_equal(layer["still"], [0.0, 0.0])  # ‖Û‖ = 0: no rescale, no NaN
    assert layer["count"] == 2 and layer["count"].dtype == np.int64  # counters are not lengths
    np.testing.assert_allclose(glob["w"], [0.0, math.sqrt(27.0)], rtol=1e-6)  # √(9+16+1+1) over floats only
    for out in (layer, glob, both_zero):
        assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_array_equal(both_zero["w"], [0.0, 0.0])
    with pytest.raises(ValueError, match="different models"):
        calibrate(stored, {"w": fresh["w"]}, "layer")
    with pytest.raises(ValueError, match="norm must be one of"):
        calibrate(stored, fresh, "l2")


# --------------------------------------------------------------------------- 3. the first retained round


def test_first_retained_round_reuses_stored_updates_with_renormalised_weights(tmp_path: Path) -> None:
    strategy = fed_eraser(1, ratio=0.5)
    store, old, new, federation, outcome, _ = run(tmp_path, rounds=3, retention=1, withdraw={"c0"}, strategy=strategy)
    with store:
        assert 1 not in [call.round for call in federation.local_calls]
        assert outcome.details["uncalibrated_rounds"] == [1]
        assert outcome.details["calibrated_rounds"] == [2, 3]
        (old_round,) = old.rounds(1, 1)
        (new_round,) = new.rounds(1, 1)
        remaining = ["c1", "c2", "c3"]
        total = sum(SIZES[c] for c in remaining)  # renormalised over the remaining participants
        expected = {name: value.astype(np.float64) for name, value in initial_model().items()}
        for c in remaining:
            stored = old_round.update(c)
            assert_models_close(new_round.update(c), stored, rtol=0, atol=0)
            for name in expected:
                expected[name] += SIZES[c] / total * stored[name]
        assert [(p.client_id, p.num_examples) for p in new_round.participants] == [(c, SIZES[c]) for c in remaining]
        assert_models_close(new_round.model_after(), expected)
        assert [p.weight for p in new_round.participants] == pytest.approx([SIZES[c] / total for c in remaining])


# --------------------------------------------------------------------------- 4. retention interval Δt


def test_only_retained_rounds_are_calibrated_and_trajectory_reaches_completed(tmp_path: Path) -> None:
    rounds = 7
    strategy = fed_eraser(None, ratio=0.5, retention=2)  # Δt: the history's own
    store, old, new, federation, outcome, _ = run(
        tmp_path, rounds=rounds, retention=2, withdraw={"c0"}, strategy=strategy
    )
    with store:
        r_e = 0.5 * LOCAL_EPOCHS
        staying = ("c1", "c2", "c3")
        assert federation.local_calls == [LocalCall(t, r_e, staying) for t in (3, 5, 7)]
        assert [t for t, _ in federation.recorded] == list(range(1, rounds + 1))  # every round, in order
        assert outcome.rounds_replayed == 3 and outcome.round_trips == 3
        assert outcome.client_epochs == pytest.approx(3 * 3 * r_e)  # calibrated rounds × remaining × r·E
        assert outcome.details["retained_rounds_used"] == [1, 3, 5, 7]
        assert outcome.details["calibration_epochs"] == r_e and outcome.details["norm"] == "layer"
        assert new.last_round() == rounds and new.trajectory != old.trajectory
        for view in new.rounds(1, rounds):
            if view.round % 2 == 0:
                assert view.participants == []
                assert_models_close(view.model_after(), view.model_before(), rtol=0, atol=0)
            else:
                assert [p.client_id for p in view.participants] == ["c1", "c2", "c3"]
                assert all(p.retained for p in view.participants)
                assert not np.allclose(flat(view.model_after()), flat(view.model_before()))
        assert_models_close(outcome.model, new.model(rounds), rtol=0, atol=0)
        (traj,) = [t for t in store.trajectories() if t.id == new.trajectory]
        assert traj.base_version == 0 and traj.info["strategy"] == "calibrated" and traj.info["clients"] == ["c0"]


def test_strategy_interval_thins_a_denser_history(tmp_path: Path) -> None:
    strategy = fed_eraser(3, ratio=1.0)
    store, _, new, federation, outcome, _ = run(tmp_path, rounds=7, retention=1, withdraw={"c1"}, strategy=strategy)
    with store:
        assert outcome.details["retained_rounds_used"] == [1, 4, 7]
        assert [call.round for call in federation.local_calls] == [4, 7]
        assert [v.round for v in new.rounds() if v.participants] == [1, 4, 7]


def test_late_joiner_calibrates_its_first_retained_round(tmp_path: Path) -> None:
    # c3 joins in round 2, c2 in round 4: base = 1. Round 2 is not retained (Δt = 2), so
    # round 3's stored updates already carry c3's contribution and must be calibrated too.
    def schedule(t: int) -> list[str]:
        return ["c0", "c1"] + (["c3"] if t >= 2 else []) + (["c2"] if t >= 4 else [])

    strategy = fed_eraser(2)
    store, old, new, federation, outcome, _ = run(
        tmp_path, rounds=5, retention=2, withdraw={"c3", "c2"}, strategy=strategy, schedule=schedule
    )
    with store:
        assert outcome.base_version == 1 and federation.started[0][0] == 1
        assert outcome.details["uncalibrated_rounds"] == []
        assert outcome.details["calibrated_rounds"] == [3, 5]
        assert [t for t, _ in federation.recorded] == [2, 3, 4, 5]
        assert_models_close(new.model(1), old.model(1), rtol=0, atol=0)
        assert_models_close(new.model(2), old.model(1), rtol=0, atol=0)  # round 2 skipped
        assert outcome.client_epochs == pytest.approx(2 * 2 * 0.5 * LOCAL_EPOCHS)  # 2 rounds × c0, c1 × r·E


def test_only_the_rounds_participants_calibrate_and_an_offline_one_is_skipped(tmp_path: Path) -> None:
    # c3 did not take part in round 2 (sampled out): it is not asked to calibrate it. c1 took part but is offline now.
    def schedule(t: int) -> list[str]:
        return ["c0", "c1", "c2"] + (["c3"] if t != 2 else [])

    strategy = fed_eraser(1)
    store, _, new, federation, outcome, _ = run(
        tmp_path, rounds=2, retention=1, withdraw={"c0"}, strategy=strategy, schedule=schedule, offline={"c1"}
    )
    with store:
        assert federation.recorded == [(1, ["c1", "c2", "c3"]), (2, ["c2"])]
        assert federation.local_calls[0].clients == ("c1", "c2")
        assert outcome.details["skipped_clients"] == {"2": ["c1"]}
        assert outcome.client_epochs == pytest.approx(1 * 0.5 * LOCAL_EPOCHS)  # only c2 answered
        (view,) = new.rounds(2, 2)
        assert_models_close(view.model_after(), moved(view.model_before(), weighted_step({"c2": view.update("c2")}, {"c2": 1.0})))


def test_residual_clients_are_never_reused_and_move_the_base(tmp_path: Path) -> None:
    # c3 was removed earlier by an approximate strategy: its rows are still in this
    # trajectory, its key is shredded. c0 is withdrawn now and joined in round 3.
    def schedule(t: int) -> list[str]:
        return ["c1", "c2", "c3"] + (["c0"] if t >= 3 else [])

    clients = make_clients()
    store = build_history(tmp_path / "store", clients, rounds=4, retention=1, schedule=schedule)
    with store:
        store.destroy_client_key("c3")  # any read of c3's updates would now raise
        old = store.reader()
        federation = toy_federation(store, clients, {"c0", "c3"})
        request = UnlearningRequest(clients=frozenset({"c0"}), completed_rounds=4, residual_clients=frozenset({"c3"}))
        outcome = fed_eraser(1).run(request, old, federation)
        assert outcome.base_version == 0  # before c3 joined, as Retrain does
        assert federation.started[0][1]["clients"] == ["c0"]
        assert federation.recorded == [(t, ["c1", "c2"]) for t in range(1, 5)]
        (round_one,) = store.reader().rounds(1, 1)
        (stored_one,) = old.rounds(1, 1)
        total = SIZES["c1"] + SIZES["c2"]
        stored = {c: stored_one.update(c) for c in ("c1", "c2")}
        assert_models_close(
            round_one.model_after(), moved(initial_model(), weighted_step(stored, {c: SIZES[c] / total for c in stored}))
        )
        assert [p.weight for p in round_one.participants] == pytest.approx([SIZES["c1"] / total, SIZES["c2"] / total])


# --------------------------------------------------------------------------- 5. nothing to forget


def test_client_that_never_participated_costs_nothing(tmp_path: Path) -> None:
    strategy = Calibrated()
    store, old, new, federation, outcome, _ = run(tmp_path, rounds=3, retention=2, withdraw={"c9"}, strategy=strategy)
    with store:
        assert federation.started[0][0] == 3 and federation.local_calls == [] and federation.recorded == []
        assert outcome.base_version == 3 and outcome.rounds_replayed == 0
        assert outcome.client_epochs == 0.0 and outcome.round_trips == 0
        assert_models_close(outcome.model, old.model(3), rtol=0, atol=0)
        assert new.last_round() == 3 and new.trajectory != old.trajectory


# --------------------------------------------------------------------------- 6. streaming


class WatchedReader:
    """Delegates to a real HistoryReader and checks no stored update outlives its round."""

    def __init__(self, reader: HistoryReader) -> None:
        self._reader = reader
        self.rounds_calls: list[tuple[int, int | None]] = []
        self.loaded_rounds: list[int] = []
        self._alive: list[tuple[int, weakref.ref]] = []
        self.max_rounds_alive = 0

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[WatchedRound]:
        self.rounds_calls.append((start, end))
        for view in self._reader.rounds(start, end):
            yield WatchedRound(view, self)

    def clients(self) -> list[str]:
        return self._reader.clients()

    def first_participation(self, client_id: str) -> int | None:
        return self._reader.first_participation(client_id)

    def model(self, version: int) -> Arrays:
        return self._reader.model(version)

    def loaded(self, round: int, arrays: Arrays) -> Arrays:
        gc.collect()
        self._alive = [(r, ref) for r, ref in self._alive if ref() is not None]
        alive = {r for r, _ in self._alive} | {round}
        self.max_rounds_alive = max(self.max_rounds_alive, len(alive))
        self._alive += [(round, weakref.ref(value)) for value in arrays.values()]
        if not self.loaded_rounds or self.loaded_rounds[-1] != round:
            self.loaded_rounds.append(round)
        return arrays


class WatchedRound:
    def __init__(self, view, owner: WatchedReader) -> None:
        self._view = view
        self._owner = owner
        self.round = view.round
        self.participants = view.participants

    def model_before(self) -> Arrays:
        return self._view.model_before()

    def model_after(self) -> Arrays:
        return self._view.model_after()

    def noise(self) -> Arrays | None:
        return self._view.noise()

    def update(self, client_id: str) -> Arrays:
        return self._owner.loaded(self.round, self._view.update(client_id))

    def updates(self):
        for info, arrays in self._view.updates():
            yield info, self._owner.loaded(self.round, arrays)


@pytest.mark.parametrize("retention", [1, 2])
def test_history_is_streamed_one_round_at_a_time(tmp_path: Path, retention: int) -> None:
    rounds = 6
    clients = make_clients()
    store = build_history(tmp_path / "store", clients, rounds=rounds, retention=retention)
    with store:
        watched = WatchedReader(store.reader())
        federation = toy_federation(store, clients, {"c1"})
        outcome = fed_eraser(retention=retention).unlearn(
            UnlearningRequest(clients=frozenset({"c1"}), completed_rounds=rounds), watched, federation
        )
        assert watched.rounds_calls == [(1, rounds)]  # one forward pass
        used = outcome.details["retained_rounds_used"]
        assert watched.loaded_rounds == used  # each round's updates asked for once, in order
        assert watched.max_rounds_alive == 1  # never two rounds' stored updates in memory
        gc.collect()
        assert not [r for r, ref in watched._alive if ref() is not None]  # none kept after the run


# --------------------------------------------------------------------------- settings


def test_hyperparameters_and_validation() -> None:
    strategy = Calibrated(
        CalibratedSettings(calibration_interval=3, calibration_ratio=0.25, calibration_norm="global"),
        UnlearningContext(local_epochs=4, retention_interval=2),
    )
    assert strategy.hyperparameters() == {
        "calibration_interval": 3,
        "calibration_ratio": 0.25,
        "calibration_norm": "global",
        "interval_used": 3,
        "calibration_epochs": 1.0,
    }
    assert strategy.calibration_epochs == 1.0
    assert Calibrated(context=UnlearningContext(retention_interval=2)).interval == 2  # none: the history's Δt
    assert Calibrated.name == "calibrated" and Calibrated().needs_client_work
    for bad, option in (
        ({"calibration_interval": 0}, "calibration-interval"),
        ({"calibration_interval": True}, "calibration-interval"),
        ({"calibration_ratio": 0.0}, "calibration-ratio"),
        ({"calibration_ratio": 1.5}, "calibration-ratio"),
        ({"calibration_ratio": float("nan")}, "calibration-ratio"),
        ({"calibration_norm": "l2"}, "calibration-norm"),
    ):
        with pytest.raises(SettingsError, match=f"calibrated setting {option}"):
            CalibratedSettings(**bad)  # type: ignore[arg-type]
