"""Evidence of forgetting on a small in-process federation: report files, figures, client re-check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from local_grid import LocalGrid
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.client.app import make_client_app, model_arrays
from fedforget.server.rounds.loop import FederatedRun, RunSettings, Withdrawal
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import build_report, data_settings, write_verification
from fedforget.simulations.task import SimulationTask
from fedforget.simulations.verification import aggregate_seeds
from fedforget.strategies.retrain import Retrain

CONFIG = SimulationConfig(
    clients=4,
    rounds=5,
    local_epochs=1.0,
    backdoors=("1",),
    backdoor_fraction=0.5,
    withdrawals=(Withdrawal("1", 5),),
    shadows=2,
)


@pytest.fixture(scope="module")
def verified_run(tmp_path_factory):
    """A backdoored client withdrawn before the last round, then verified (no simulation engine)."""
    out = tmp_path_factory.mktemp("run")
    initial = model_arrays(build_model(CONFIG.dataset, seed=CONFIG.seed))
    grid = LocalGrid(make_client_app(SimulationTask(data_settings(CONFIG), model_seed=CONFIG.seed)), CONFIG.clients)
    with HistoryStore.create(out / "store", federation_id="f", model_spec=ModelSpec.from_arrays(initial)) as store:
        strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        settings = RunSettings(
            num_rounds=CONFIG.rounds,
            train_config={"local-epochs": CONFIG.local_epochs, "lr": CONFIG.lr, "batch-size": CONFIG.batch_size},
        )
        from fedforget.simulations.runner import make_evaluate_fn

        outcome = FederatedRun(
            grid, store, strategy, Retrain(), settings,
            withdrawals=CONFIG.withdrawals, evaluate_fn=make_evaluate_fn(CONFIG.dataset, CONFIG.seed),
        ).execute(initial)
    report = build_report(CONFIG, out, outcome, wall_seconds=1.0)
    verification = write_verification(CONFIG, out, [(CONFIG, out, report)])
    return out, verification


def test_verification_document_has_the_documented_shape(verified_run):
    out, verification = verified_run
    on_disk = json.loads((out / "verification.json").read_text())
    assert on_disk["seeds"] == [0]
    (entry,) = on_disk["unlearning"]
    assert entry["client"] == "1" and entry["strategy"] == "retrain" and entry["round"] == 5
    for role in ("original", "unlearned", "retrain"):
        for figure in ("test_accuracy", "forget_accuracy", "backdoor_asr", "mia_auc"):
            assert 0.0 <= entry[role][figure] <= 1.0, (role, figure)
        assert 0.0 <= entry[role]["lira_auc"] <= 1.0
        assert 0.0 <= entry[role]["remaining_accuracy"] <= 1.0
        assert len(entry[role]["class_accuracy"]) == 10 and all(0.0 <= a <= 1.0 for a in entry[role]["class_accuracy"])
    assert set(entry["distance_to_retrain"]) >= {"l2", "js"}
    assert entry["evidence_seconds"] < 30
    # Exact retraining forgets exactly as much as the retrain: never over-forgetting.
    assert entry["over_forgetting"]["flagged"] is False and entry["over_forgetting"]["forget_gap_pts"] == 0.0
    assert entry["over_forgetting"]["seeds_flagged"] == 0


def test_original_model_remembers_the_canary_and_the_retrain_does_not(verified_run):
    _, verification = verified_run
    (entry,) = verification["unlearning"]
    assert entry["original"]["backdoor_asr"] >= 0.25
    assert entry["retrain"]["backdoor_asr"] <= 0.1
    assert entry["original"]["backdoor_asr"] >= entry["retrain"]["backdoor_asr"] + 0.2
    # Exact retraining: the unlearned model is the retrained one.
    assert entry["distance_to_retrain"]["l2"] == 0.0
    assert entry["distance_to_retrain"]["js"] == pytest.approx(0.0, abs=1e-9)
    assert entry["distance_to_retrain"]["original_l2"] > 0.0


def test_plots_models_and_client_files_are_written(verified_run):
    out, _ = verified_run
    for name in ("accuracy.png", "backdoor_asr.png", "mia_roc-client1.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for role in ("original", "unlearned", "retrain"):
        assert (out / "models" / f"{role}-client1-round5.npz").exists()
    assert (out / "clients" / "1" / "train.npz").exists()


def test_client_rechecks_with_its_own_data(verified_run, tmp_path):
    out, verification = verified_run
    figures = {}
    for role in ("original", "unlearned"):
        result = CliRunner().invoke(
            app,
            [
                "client", "verify",
                "--model", str(out / "models" / f"{role}-client1-round5.npz"),
                "--dataset", "digits",
                "--data", str(out / "clients" / "1" / "train.npz"),
                "--holdout", str(out / "clients" / "1" / "holdout.npz"),
                "--trigger-target", "0", "--trigger-size", "3", "--trigger-corner", "top-left",
                "--output", str(tmp_path / f"{role}.json"),
            ],
        )
        assert result.exit_code == 0, result.output
        figures[role] = json.loads((tmp_path / f"{role}.json").read_text())
    # The client sees what the server reported, from its own files alone.
    (entry,) = verification["unlearning"]
    for role in ("original", "unlearned"):
        assert figures[role]["mia_auc"] == pytest.approx(entry[role]["mia_auc"])
    assert figures["original"]["backdoor_asr"] > figures["unlearned"]["backdoor_asr"] + 0.2


def test_client_verify_rejects_a_bad_data_file(verified_run, tmp_path):
    out, _ = verified_run
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((2, 1, 8, 8)))
    result = CliRunner().invoke(
        app,
        ["client", "verify", "--model", str(out / "models" / "unlearned-client1-round5.npz"),
         "--dataset", "digits", "--data", str(tmp_path / "bad.npz"),
         "--holdout", str(out / "clients" / "1" / "holdout.npz")],
    )
    assert result.exit_code == 3  # an unusable data file
    assert "it must hold x (inputs) and y (labels)" in " ".join(result.output.split())


def test_seeds_are_summarised_by_mean_and_sample_std():
    def doc(seed, asr):
        figures = {"test_accuracy": 0.9, "forget_accuracy": 0.8, "backdoor_asr": asr, "mia_auc": 0.5,
                   "class_accuracy": [0.9, 0.7 + 0.1 * seed]}
        return {
            "seed": seed, "trigger": None, "backdoor_clients": ["1"],
            "unlearning": [{
                "client": "1", "clients": ["1"], "round": 5, "strategy": "retrain", "backdoored": ["1"],
                "original": figures, "unlearned": figures, "retrain": figures,
                "distance_to_retrain": {"l2": 0.0, "js": 0.0},
                "evidence_seconds": 1.0, "shadow_training_seconds": 2.0,
                "members": 40 + seed, "canaries": 0, "nonmembers": 360,
                "over_forgetting": {"flagged": seed == 2},
            }],
        }

    summary = aggregate_seeds([doc(0, 0.8), doc(1, 0.9), doc(2, 1.0)])
    original = summary["unlearning"][0]["original"]
    assert original["backdoor_asr"] == pytest.approx(0.9)
    assert original["backdoor_asr_std"] == pytest.approx(0.1)
    assert original["test_accuracy_std"] == 0.0
    assert original["class_accuracy"] == pytest.approx([0.9, 0.8])  # per class, over seeds
    assert original["class_accuracy_std"] == pytest.approx([0.0, 0.1])
    judged = summary["unlearning"][0]["over_forgetting"]
    assert judged["flagged"] is False and judged["seeds_flagged"] == 1  # identical models: the mean is not flagged
    assert summary["seeds"] == [0, 1, 2]
    # The counts a TPR at 1 % FPR is read against survive the summary.
    counts = summary["unlearning"][0]
    assert (counts["members"], counts["members_std"], counts["nonmembers"]) == (41.0, 1.0, 360.0)


def test_a_withdrawal_of_a_thousand_clients_names_files_the_file_system_accepts(tmp_path) -> None:
    from fedforget.simulations.run_dir import LONGEST_CLIENTS_LABEL, clients_label

    assert clients_label(["3"]) == "3" and clients_label(["1", "4"]) == "1+4"  # short lists spelled out
    many = [str(c) for c in range(1000)]
    label = clients_label(many)
    assert len(label) <= LONGEST_CLIENTS_LABEL and label.startswith("0+999-more-")
    assert clients_label(many[:-1]) != label  # another group, another name
    path = tmp_path / f"unlearned-client{label}-round10.npz"
    path.write_bytes(b"")  # raised ENAMETOOLONG with the whole list in the name
    assert path.exists()
