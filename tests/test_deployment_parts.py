"""The parts of a deployment that need no running SuperLink: run config, data files, replies, ledger recovery."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fixtures import initial_model, local_federation
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.client.deployment import NodeConfigError, OrganisationTask, read_data_file
import json

from fedforget.identity import generate_keypair, load_public_key
from fedforget.run_config import DeploymentConfig, RunConfigError
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.rounds.grids import PromptGrid
from fedforget.server.rounds.loop import RunError, RunSettings
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.ledger.audit import audit
from fedforget.server.ledger.log import Ledger

REQUIRED = {"state-dir": "/srv/fedforget", "federation-id": "fed", "signing-key": "/srv/keys/federation.key"}


# -- run config ----------------------------------------------------------------------


def test_the_run_config_gives_every_setting_with_defaults_for_the_rest():
    config = DeploymentConfig.from_run_config(
        {**REQUIRED, "num-rounds": 7, "strategy": "calibrated", "lr": 1, "unlearning.calibration-ratio": 0.25}
    )
    assert config.state_dir == Path("/srv/fedforget")
    assert config.state.registry == Path("/srv/fedforget/state/consent.sqlite")
    assert config.state.ledger == Path("/srv/fedforget/state/ledger.jsonl")
    assert (config.num_rounds, config.strategy, config.lr, config.resume) == (7, "calibrated", 1.0, False)
    assert config.unlearning == {"calibration-ratio": 0.25}


def test_every_bad_key_is_named_in_one_error():
    with pytest.raises(RunConfigError) as caught:
        DeploymentConfig.from_run_config(
            {
                "state-dir": "relative/dir",
                "signing-key": "",
                "num-rounds": "five",
                "resume": "yes",
                "strategy": "forget-everything",
                "nmu-rounds": 3,
            }
        )
    message = str(caught.value)
    for expected in (
        "federation-id is required",
        "signing-key is required",
        "state-dir must be an absolute path",
        "num-rounds must be an integer",
        "resume must be true or false",
        "unknown unlearning strategy 'forget-everything'; available: retrain, replay, subtract",
        "unknown keys ['nmu-rounds']",
    ):
        assert expected in message, message


@pytest.mark.parametrize(
    ("unlearning", "expected"),
    [
        ({"unlearning.calibration-ration": 0.5},
         "strategy 'calibrated' has no setting 'calibration-ration'; its settings are: calibration-interval, "
         "calibration-norm, calibration-ratio"),
        ({"unlearning.final-rounds": 1}, "setting 'final-rounds' does not apply to strategy 'calibrated': "
         "it is a setting of replay"),
        ({"unlearning.calibration-ratio": "half"}, "calibrated setting calibration-ratio must be a number, got 'half'"),
        ({"unlearning.calibration-ratio": 1.5}, "calibrated setting calibration-ratio must be at most 1"),
    ],
)
def test_unlearning_keys_are_checked_against_the_chosen_strategy(unlearning, expected):
    with pytest.raises(RunConfigError) as caught:
        DeploymentConfig.from_run_config({**REQUIRED, "strategy": "calibrated", **unlearning})
    assert expected in str(caught.value)


def test_your_own_model_is_named_as_package_module_function():
    config = DeploymentConfig.from_run_config({**REQUIRED, "model": "fedforget.simulations.models:DigitsCNN"})
    assert config.model_spec == "fedforget.simulations.models:DigitsCNN"
    assert DeploymentConfig.from_run_config(REQUIRED).model_spec == "digits"
    with pytest.raises(RunConfigError, match="model must be package.module:function"):
        DeploymentConfig.from_run_config({**REQUIRED, "model": "my_model"})


def test_the_pyproject_defaults_parse_once_the_required_keys_are_given():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    config = DeploymentConfig.from_run_config({**defaults, **REQUIRED})
    assert config.dataset == "digits" and config.strategy == "retrain"


def test_a_run_neither_overwrites_nor_invents_the_state_it_resumes(tmp_path):
    from fedforget.server.store.errors import FedforgetError
    from fedforget.server.deployment import deployment_setup

    generate_keypair(tmp_path / "federation.key", tmp_path / "federation.pub")
    settings = {**REQUIRED, "state-dir": str(tmp_path / "state"), "signing-key": str(tmp_path / "federation.key")}
    with pytest.raises(FedforgetError, match="holds no run to continue"):
        deployment_setup(DeploymentConfig.from_run_config({**settings, "resume": True}))
    (tmp_path / "state" / "store").mkdir(parents=True)
    (tmp_path / "state" / "store" / "store.json").write_text("{}")
    with pytest.raises(FedforgetError, match="already holds a run"):
        deployment_setup(DeploymentConfig.from_run_config(settings))
    with pytest.raises(FedforgetError, match="does not exist"):
        deployment_setup(DeploymentConfig.from_run_config({**settings, "signing-key": str(tmp_path / "none.key")}))


def test_a_state_dir_whose_run_recorded_no_round_takes_a_new_run(tmp_path):
    from fedforget.server.app import open_history_store
    from fedforget.server.deployment import deployment_setup
    from fedforget.server.store.history_store import ModelSpec

    generate_keypair(tmp_path / "federation.key", tmp_path / "federation.pub")
    settings = {**REQUIRED, "state-dir": str(tmp_path / "state"), "signing-key": str(tmp_path / "federation.key")}
    HistoryStore.create(tmp_path / "state" / "store", federation_id="fed",
                        model_spec=ModelSpec.from_arrays(initial_model())).close()  # its run failed before round 1
    setup = deployment_setup(DeploymentConfig.from_run_config(settings))
    with open_history_store(setup) as store:
        assert store.last_completed_round() == 0 and store.federation_id == "fed"


# -- the organisation's data -------------------------------------------------------


def _context(node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={"dataset": "digits"})


def test_an_organisation_trains_on_the_data_file_its_node_config_names(tmp_path):
    path = tmp_path / "org.npz"
    np.savez(path, x=np.zeros((5, 1, 8, 8), np.float32), y=np.arange(5))
    data = OrganisationTask().load_data(_context({"data-file": str(path)}))
    assert len(data.train) == 5
    model = OrganisationTask().build_model(_context({"data-file": str(path)}))
    assert model(data.train[:2][0]).shape == (2, 10)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "does not exist"),
        ({"images": np.zeros((2, 1, 8, 8))}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((2, 64)), "y": np.zeros(2)}, "x must be (N, C, H, W)"),
    ],
)
def test_a_bad_data_file_is_refused_with_what_is_wrong(tmp_path, arrays, message):
    path = tmp_path / "org.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    with pytest.raises(NodeConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_data_file(path)


def test_an_organisation_builds_the_model_the_run_config_names():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config={"dataset": "digits", "model": "torch.nn:Identity"})
    assert isinstance(OrganisationTask().build_model(context), torch.nn.Identity)


def test_a_node_without_a_data_file_is_told_how_to_name_one():
    with pytest.raises(NodeConfigError, match="--node-config"):
        OrganisationTask().load_data(_context({"partition-id": 0}))


def test_export_data_writes_one_share_per_organisation_and_never_overwrites(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export-data", "--out", str(tmp_path), "--partitions", "3"])
    assert result.exit_code == 0, result.output
    sizes = [len(read_data_file(tmp_path / f"part-{i}.npz")[1]) for i in range(3)]
    assert sum(sizes) == 1437 and max(sizes) - min(sizes) <= 1
    again = runner.invoke(app, ["export-data", "--out", str(tmp_path), "--partitions", "3"])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


# -- collecting replies ------------------------------------------------------------------


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()


class _SlowGrid:
    """Replies to message i become available i·0.1 s after the push."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i in range(self.count)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = (time.monotonic() - self.pushed_at) / 0.1
        return [_Reply(m) for m in sorted(message_ids) if int(m[1:]) <= ready]


def test_replies_are_collected_promptly_and_each_once():
    grid = _SlowGrid(4)
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll_interval=0.05).send_and_receive([], timeout=10))  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2", "m3"]
    assert time.monotonic() - started < 1.5  # Flower's own loop would sleep 3 s between pulls


def test_collecting_replies_stops_at_the_timeout():
    grid = _SlowGrid(1000)
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll_interval=0.05).send_and_receive([], timeout=0.3))  # type: ignore[arg-type]
    assert 0 < len(replies) < 1000 and time.monotonic() - started < 1.0


# -- after a crash -------------------------------------------------------------------------


def _accountability(tmp_path: Path) -> Accountability:
    """What a (re)started server makes: nothing of a crashed process's memory survives."""
    if not (tmp_path / "server.key").exists():
        generate_keypair(tmp_path / "server.key", tmp_path / "server.pub")
    return Accountability(
        ledger_path=tmp_path / "ledger.jsonl", server_key=tmp_path / "server.key",
        certificates_dir=tmp_path / "certificates", federation_id="test-federation",
    )


def _accountable_run(tmp_path: Path, rounds: int):
    return local_federation(tmp_path / "store", clients=2, rounds=rounds, accountability=_accountability(tmp_path))


def _crash_after(tmp_path: Path, entries: int, torn: bytes = b"") -> None:
    """The ledger and its heads as a crash after ``entries`` complete entries leaves them (heads are signed after entries)."""
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(b"".join(ledger.read_bytes().splitlines(keepends=True)[:entries]) + torn)
    heads = tmp_path / "ledger-heads.jsonl"
    kept = [h for h in heads.read_bytes().splitlines(keepends=True) if json.loads(h)["head"]["tree_size"] <= entries]
    heads.write_bytes(b"".join(kept))


def _audit_errors(tmp_path: Path, store: Path) -> list:
    return audit(tmp_path / "ledger.jsonl", load_public_key(tmp_path / "server.pub"), store=store).findings.errors


def test_round_entries_a_crash_kept_from_the_ledger_are_rebuilt_from_the_store(tmp_path):
    fed = _accountable_run(tmp_path, rounds=3)
    fed.run.execute(initial_model())
    ledger_path = tmp_path / "ledger.jsonl"
    lines = ledger_path.read_bytes().splitlines(keepends=True)
    # The crash: round 3 committed to the store, its ledger entry never written, a torn line after round 2.
    _crash_after(tmp_path, 2, torn=lines[2][:40])
    restarted = _accountability(tmp_path)
    added = restarted.reconcile(fed.store)
    assert added == [(1, 3)]
    with Ledger.open(ledger_path) as ledger:
        entries = list(ledger.entries())
        ledger.verify()
    assert [e.kind for e in entries] == ["round", "round", "ledger-repair", "round"]
    # rebuilt from the store, which holds every fact the entry records
    assert entries[-1].body == json.loads(lines[2])["body"]
    assert restarted.reconcile(fed.store) == []
    fed.store.close()
    assert _audit_errors(tmp_path, tmp_path / "store") == []


def test_a_resumed_run_repairs_the_ledger_before_its_first_round(tmp_path):
    fed = _accountable_run(tmp_path, rounds=2)
    fed.run.execute(initial_model())
    ledger_path = tmp_path / "ledger.jsonl"
    _crash_after(tmp_path, 1)
    fed.store.close()
    store = HistoryStore.open(tmp_path / "store")
    resumed = local_federation(tmp_path / "store", clients=2, rounds=3, store=store, accountability=_accountability(tmp_path))
    resumed.run.execute(initial_model())
    with Ledger.open(ledger_path) as ledger:
        rounds = [e.body["round"] for e in ledger.entries() if e.kind == "round"]
    assert rounds == [1, 2, 3]
    store.close()
    assert _audit_errors(tmp_path, tmp_path / "store") == []


def test_organisations_that_withdrew_are_not_waited_for(tmp_path):
    fed = local_federation(tmp_path / "store", clients=2, rounds=1)
    fed.run.settings = RunSettings(num_rounds=1, expected_clients=3, node_wait_timeout=0.3)
    with pytest.raises(RunError, match="only 2 of 3 expected nodes"):
        fed.run._wait_for_nodes()
    fed.run._events = [{"kind": "unlearning", "clients": ["7"]}]
    fed.run._wait_for_nodes()
    fed.store.close()
