"""The Flower layer on an in-process grid: identity, recording, withdrawal, exact retrain, resume."""

from __future__ import annotations

import numpy as np
import pytest
from flower_fixtures import TRAIN_CONFIG, initial_model, local_federation
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from local_grid import LocalGrid

from fedforget import wire
from fedforget.server.rounds.client_identity import ClientIdentityError, ClientIdResolver
from fedforget.server.rounds.loop import SilentObserver, Withdrawal
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.recording import RecordingError, RecordingFedAvg
from fedforget.strategies.base import Federation, HistoryView, UnlearningOutcome, UnlearningRequest
from fedforget.strategies.retrain import Retrain


def assert_models_equal(a: wire.Arrays, b: wire.Arrays, atol: float = 0.0) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


# -- identity ------------------------------------------------------------------


def test_simulated_nodes_are_their_partition_by_registration_order_and_get_no_message():
    grid = LocalGrid(ClientApp(), 3)  # an unchanged Flower client: it answers nothing but train/evaluate
    mapping = ClientIdResolver().resolve(grid, list(grid.get_node_ids()))
    assert mapping == {grid.node_of(0): "0", grid.node_of(1): "1", grid.node_of(2): "2"}
    assert sorted(mapping) != [grid.node_of(i) for i in range(3)]  # not the order of node ids
    assert grid.sent == []


def test_registered_names_win_and_need_no_message():
    grid = LocalGrid(ClientApp(), 2, names={0: "hospital-a", 1: "bank-b"})
    resolver = ClientIdResolver()
    assert resolver.resolve(grid, [grid.node_of(0), grid.node_of(1)]) == {
        grid.node_of(0): "hospital-a", grid.node_of(1): "bank-b"
    }
    assert resolver.kinds() == {"hospital-a": "registered-name", "bank-b": "registered-name"}
    assert grid.sent == []


def test_unnamed_deployed_nodes_are_keyed_by_their_node_key():
    grid = LocalGrid(ClientApp(), 2, deployed=True)
    resolver = ClientIdResolver()
    mapping = resolver.resolve(grid, list(grid.get_node_ids()))
    assert all(client.startswith("node-") and len(client) == 21 for client in mapping.values())
    assert len(set(mapping.values())) == 2 and set(resolver.kinds().values()) == {"node-key"}


def test_two_nodes_claiming_one_client_id_are_refused():
    grid = LocalGrid(ClientApp(), 2, names={0: "org", 1: "org"})
    with pytest.raises(ClientIdentityError, match="claimed by nodes"):
        ClientIdResolver().resolve(grid, list(grid.get_node_ids()))


def test_simulated_nodes_registered_at_the_same_instant_are_refused():
    grid = LocalGrid(ClientApp(), 2)
    grid.registered_at[grid.node_of(1)] = grid.registered_at[grid.node_of(0)]
    with pytest.raises(ClientIdentityError, match="same instant"):
        ClientIdResolver().resolve(grid, list(grid.get_node_ids()))


# -- recording -----------------------------------------------------------------


def test_recorded_updates_reproduce_each_aggregate(tmp_path):
    fed = local_federation(tmp_path / "s", clients=4, rounds=3)
    fed.run.execute(initial_model())
    reader = fed.store.reader()
    rounds = list(reader.rounds())
    assert [r.round for r in rounds] == [1, 2, 3]
    for view in rounds:
        assert sorted(p.client_id for p in view.participants) == ["0", "1", "2", "3"]
        assert sum(p.weight for p in view.participants) == pytest.approx(1.0)
        step = {k: v.copy() for k, v in view.model_after().items()}
        before = view.model_before()
        recombined = {k: np.zeros_like(v) for k, v in step.items()}
        for info, update in view.updates():
            assert info.weight == pytest.approx(info.num_examples / sum(p.num_examples for p in view.participants))
            for k in recombined:
                recombined[k] += info.weight * update[k]
        for k in step:
            np.testing.assert_allclose(recombined[k], step[k] - before[k], atol=1e-6, err_msg=k)


def test_recording_strategy_is_a_drop_in_for_flowers_fedavg_loop(tmp_path):
    """A user's ServerApp that calls FedAvg.start() only swaps the class; clients are plain Flower."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        index = 1 + int(context.node_config["partition-id"])
        bump = 1.0 + index  # each client moves the model by a different amount
        reply = RecordDict(
            {
                "arrays": ArrayRecord([a + bump for a in arrays]),
                "metrics": MetricRecord({"num-examples": 10 * index}),
            }
        )
        return Message(reply, reply_to=msg)

    grid = LocalGrid(app, 2, names={0: "org-a", 1: "org-b"})
    initial = {"0": np.zeros(3, np.float32)}
    store = HistoryStore.create(tmp_path / "s", federation_id="f", model_spec=ModelSpec.from_arrays(initial))
    strategy = RecordingFedAvg(store, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([initial["0"]]), num_rounds=2)
    assert store.last_completed_round() == 2
    view = next(store.reader().rounds())
    updates = {info.client_id: (info, u["0"]) for info, u in view.updates()}
    assert updates["org-a"][0].weight == pytest.approx(1 / 3)
    np.testing.assert_allclose(updates["org-a"][1], 2.0)
    np.testing.assert_allclose(updates["org-b"][1], 3.0)
    # FedAvg's own result is unchanged by recording: (10*2 + 20*3)/30 per round.
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], 2 * 80 / 30, rtol=1e-6)


def test_round_out_of_order_with_the_store_is_refused(tmp_path):
    fed = local_federation(tmp_path / "s", clients=2, rounds=2)
    fed.run.execute(initial_model())
    with pytest.raises(RecordingError, match="next round must be 3"):
        list(fed.strategy.configure_train(1, wire.record_from_arrays(initial_model()), ConfigRecord(), fed.grid))


def test_late_reply_from_withdrawn_client_is_dropped(tmp_path, caplog):
    fed = local_federation(tmp_path / "s", clients=3, rounds=1)
    model = wire.record_from_arrays(initial_model())
    messages = list(fed.strategy.configure_train(1, model, ConfigRecord(dict(TRAIN_CONFIG)), fed.grid))
    replies = list(fed.grid.send_and_receive(messages))
    fed.strategy.exclude(["1"])  # withdrawn while its reply was in flight
    fed.strategy.aggregate_train(1, replies)
    fed.strategy.flush()  # recording runs on a background thread
    view = next(fed.store.reader().rounds())
    assert sorted(p.client_id for p in view.participants) == ["0", "2"]
    assert "dropped a reply from withdrawn client 1" in caplog.text


# -- withdrawal and exact retraining ---------------------------------------------------


def test_withdrawn_client_gets_no_instruction_and_retrain_is_exact(tmp_path):
    """Retraining equals a federation the client never joined, model for model."""
    fed = local_federation(tmp_path / "a", clients=3, rounds=4, withdrawals=[Withdrawal("1", 3)])
    outcome = fed.run.execute(initial_model())

    withdrawn_node = fed.grid.node_of(1)  # partition 1
    rounds_sent = [
        int(m.content.config_records["config"]["server-round"])
        for m in fed.grid.sent
        if m.metadata.dst_node_id == withdrawn_node and m.metadata.message_type == "train"
    ]
    assert rounds_sent == [1, 2]  # trained before withdrawing, never again (retrain included)

    (event,) = outcome.unlearning
    assert event["clients"] == ["1"] and event["round"] == 3 and event["rounds_replayed"] == 2
    assert event["client_epochs"] == pytest.approx(4.0)  # 2 rounds x 2 remaining clients x 1 epoch

    never_joined = local_federation(tmp_path / "b", clients=3, rounds=4, withdrawals=[Withdrawal("1", 1)])
    reference = never_joined.run.execute(initial_model())
    assert_models_equal(outcome.model, reference.model)
    # The current trajectory holds no trace of the withdrawn client.
    reader = fed.store.reader()
    assert "1" not in reader.clients()
    for view in reader.rounds():
        assert_models_equal(view.model_after(), never_joined.store.read_model(view.round))
    # The original trajectory is still there (until its key is destroyed), no longer current.
    original = fed.store.reader(event["source_trajectory"])
    assert original.first_participation("1") == 1


def test_withdrawal_before_first_participation_replays_nothing(tmp_path):
    fed = local_federation(tmp_path / "s", clients=2, rounds=2, withdrawals=[Withdrawal("0", 1)])
    outcome = fed.run.execute(initial_model())
    (event,) = outcome.unlearning
    assert event["rounds_replayed"] == 0 and event["client_epochs"] == 0


# -- resume ----------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


class StopAfterRound(SilentObserver):
    """Observer that kills the run once a given round is committed, as a crash would."""

    def __init__(self, round_: int) -> None:
        self.round = round_

    def round_finished(self, entry):
        if entry["round"] == self.round:
            raise _Interrupt()


def test_resume_after_interruption_loses_nothing(tmp_path):
    reference = local_federation(tmp_path / "ref", clients=3, rounds=4, withdrawals=[Withdrawal("2", 3)])
    expected = reference.run.execute(initial_model())

    first = local_federation(
        tmp_path / "s", clients=3, rounds=4, withdrawals=[Withdrawal("2", 3)], observer=StopAfterRound(2)
    )
    with pytest.raises(_Interrupt):
        first.run.execute(initial_model())
    assert first.store.last_completed_round() == 2
    first.store.close()

    store = HistoryStore.open(tmp_path / "s")
    resumed = local_federation(tmp_path / "s", clients=3, rounds=4, withdrawals=[Withdrawal("2", 3)], store=store)
    outcome = resumed.run.execute(initial_model())
    assert outcome.resumed_from == 2
    assert [e["round"] for e in outcome.timeline] == [1, 2, 3, 4]
    assert len(outcome.unlearning) == 1
    assert_models_equal(outcome.model, expected.model)


class CrashingRetrain(Retrain):
    """Retrain that dies after replaying one round, like a server killed mid-unlearning."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        class Dying(Federation):
            def remaining_clients(self):
                return federation.remaining_clients()

            def start_trajectory(self, base_version, info):
                federation.start_trajectory(base_version, info)

            def train_round(self, server_round, model, *, clients=None):
                federation.train_round(server_round, model, clients=clients)
                raise _Interrupt()

            def local_training(self, server_round, model, *, local_epochs):
                return federation.local_training(server_round, model, local_epochs=local_epochs)

            def record_round(self, server_round, model_after, updates):
                federation.record_round(server_round, model_after, updates)

            def client_unlearning(self, client_id, model, method):
                return federation.client_unlearning(client_id, model, method)

        return super().unlearn(request, history, Dying())


def test_unlearning_cut_short_is_redone_on_resume(tmp_path):
    reference = local_federation(tmp_path / "ref", clients=3, rounds=3, withdrawals=[Withdrawal("0", 3)])
    expected = reference.run.execute(initial_model())

    first = local_federation(
        tmp_path / "s", clients=3, rounds=3, withdrawals=[Withdrawal("0", 3)], unlearner=CrashingRetrain()
    )
    with pytest.raises(_Interrupt):
        first.run.execute(initial_model())
    first.store.close()

    store = HistoryStore.open(tmp_path / "s")
    resumed = local_federation(tmp_path / "s", clients=3, rounds=3, withdrawals=[Withdrawal("0", 3)], store=store)
    outcome = resumed.run.execute(initial_model())
    assert len(outcome.unlearning) == 1
    statuses = [t.status for t in sorted(store.trajectories(), key=lambda t: t.id)]
    assert statuses == ["open", "abandoned", "complete"]  # original, the cut-short unlearning, the redo
    assert_models_equal(outcome.model, expected.model)


class RequestAgain:
    """A consent source that still lists client 1's request after its unlearning (a crash fell in between)."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.begun: list[str] = []

    def due(self, server_round, already_withdrawn):  # type: ignore[no-untyped-def]
        from fedforget.server.withdrawal.consent import WithdrawalNotice

        return [WithdrawalNotice("1", "wr-1", {"request_hash": "0" * 64})] if server_round >= 2 else []

    def started(self, notices):  # type: ignore[no-untyped-def]
        self.begun += [n.client_id for n in notices]

    def finished(self, notice, certificate):  # type: ignore[no-untyped-def]
        self.done.append(notice.client_id)

    def failed(self, notice, reason):  # type: ignore[no-untyped-def]
        raise AssertionError(reason)


def test_a_request_still_listed_after_its_unlearning_is_reported_done_not_redone(tmp_path):
    consent = RequestAgain()
    fed = local_federation(tmp_path / "s", clients=3, rounds=4, consent=consent)  # type: ignore[arg-type]
    outcome = fed.run.execute(initial_model())
    assert [e["clients"] for e in outcome.unlearning] == [["1"]]  # once, before round 2
    assert consent.begun == ["1"] and consent.done == ["1", "1", "1"]  # then reported done at rounds 3 and 4


def test_an_approximate_unlearning_is_measured_against_a_reference_retrain_the_run_does_not_continue(tmp_path):
    from fedforget.strategies.subtract import Subtract

    fed = local_federation(
        tmp_path / "s", clients=3, rounds=4, withdrawals=[Withdrawal("2", 3)], unlearner=Subtract(),
        reference_retrain=True,
    )
    outcome = fed.run.execute(initial_model())
    (event,) = outcome.unlearning
    statuses = {t.id: t.status for t in fed.store.trajectories()}
    assert statuses[event["trajectory"]] == "complete" and statuses[event["reference_trajectory"]] == "reference"
    assert fed.store.current_trajectory() == event["trajectory"]  # the run went on from subtract's model
    assert "2" not in fed.store.reader(event["reference_trajectory"]).clients()
    assert event["retrain_client_epochs"] == 2 * 2 * 1.0 and event["residual_clients"] == ["2"]
