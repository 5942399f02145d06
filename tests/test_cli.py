"""The command line: every command has --help; bad input fails clearly and writes nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedforget.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        [], ["simulate"], ["bench"], ["bench", "overhead"], ["bench", "unlearning"], ["client"], ["client", "verify"],
        ["client", "verify-certificate"], ["keys"], ["keys", "generate"], ["audit"], ["audit", "verify"],
        ["audit", "client"], ["withdraw"], ["withdraw", "request"], ["withdraw", "status"], ["withdrawal-service"],
        ["enroll"], ["unlearn"], ["certs"], ["export-data"], ["bench", "deployment"],
    ],
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cifar"], "--dataset 'cifar' is not known; choose one of: digits, mnist, fashion-mnist"),
        (["--strategy", "magic"], "unknown unlearning strategy 'magic'; available: retrain, replay, subtract"),
        (["--clients", "4", "--withdraw", "7@2"], "there is no client '7'"),
        (["--rounds", "3", "--withdraw", "1@9"], "between 1 and the last round, 3"),
        (["--withdraw", "one-at-two"], "expected CLIENT@ROUND"),
        (["--partition", "zipf"], "--partition 'zipf' is not known"),
        (["--store-dtype", "int8"], "--store-dtype 'int8' is not known"),
        (["--clients", "2", "--withdraw", "0@2", "--withdraw", "1@2"], "at least one client must remain"),
        (["--clients", "4", "--backdoor", "9"], "--backdoor 9: there is no client '9'"),
        (["--backdoor-fraction", "1.5"], "--backdoor-fraction must be in (0, 1]"),
        (["--backdoor-target", "10"], "--backdoor-target must be a class 0..9"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_bad_simulation_settings_fail_before_writing(tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_unwritable_output_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["simulate", "--out", str(blocker / "run"), "--rounds", "1"])
    assert result.exit_code == 2
    assert "is not writable" in result.output and str(blocker) in result.output.replace("\n", "")


def test_resume_without_a_run_is_refused(tmp_path):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "nothing"), "--resume"])
    assert result.exit_code == 2
    assert "holds no fedforget simulation to resume" in " ".join(result.output.split())


def _store_of(out, config, *, federation_id=None, model=None):
    """A store as `fedforget simulate` leaves it after an interruption, without running one."""
    from fedforget.client.app import model_arrays
    from fedforget.server.store.history_store import HistoryStore, ModelSpec
    from fedforget.simulations.models import build_model
    from fedforget.simulations.runner import CONFIG_META
    from fedforget.simulations.runner import federation_id as federation_of

    arrays = model or model_arrays(build_model(config.dataset, seed=config.seed))
    with HistoryStore.create(
        out / "store",
        federation_id=federation_id or federation_of(config),
        model_spec=ModelSpec.from_arrays(arrays),
    ) as store:
        store.set_meta(CONFIG_META, config.to_json())
    (out / "simulation.json").write_text(json.dumps(config.to_json()))


def test_resume_with_other_settings_names_the_differences(tmp_path):
    from fedforget.simulations.config import SimulationConfig

    _store_of(tmp_path / "run", SimulationConfig(clients=3, rounds=4))
    result = runner.invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "run"), "--clients", "5"])
    assert result.exit_code == 2
    assert "clients: 3 -> 5" in result.output


def test_resume_of_a_store_from_another_federation_or_model_is_refused(tmp_path):
    import numpy as np

    from fedforget.simulations.config import SimulationConfig

    config = SimulationConfig(clients=3, rounds=4)
    _store_of(tmp_path / "other-federation", config, federation_id="hospital-consortium")
    result = runner.invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "other-federation")])
    assert result.exit_code == 2
    assert "hospital-consortium" in result.output

    _store_of(tmp_path / "other-model", config, model={"w": np.zeros((3, 3), np.float32)})
    result = runner.invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "other-model")])
    assert result.exit_code == 2
    assert "model" in result.output.lower()


def test_withdraw_without_its_settings_says_which_are_missing():
    result = runner.invoke(app, ["withdraw", "--server", "127.0.0.1:1", "--client", "org-a"])
    assert result.exit_code == 2
    assert "withdrawing needs --ca, --key, --federation" in " ".join(result.output.split())


def test_certs_writes_a_federation_s_credentials_and_never_overwrites(tmp_path):
    import os
    import stat

    from cryptography import x509

    from fedforget.identity import load_private_key, load_public_key

    out = tmp_path / "pki"
    result = runner.invoke(app, ["certs", "--out", str(out), "--host", "127.0.0.1", "--host", "superlink.example",
                                 "--org", "org-a", "--org", "org-b"])
    assert result.exit_code == 0, result.output
    for private in ("ca.key", "server.key", "federation.key", "orgs/org-a.key", "orgs/org-b.key"):
        assert stat.S_IMODE(os.stat(out / private).st_mode) == 0o600, private
    certificate = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example" in names.get_values_for_type(x509.DNSName)
    assert (out / "orgs" / "org-a.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (out / "orgs" / "org-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    load_private_key(out / "orgs" / "org-b.key")
    load_public_key(out / "federation.pub")
    again = runner.invoke(app, ["certs", "--out", str(out), "--host", "127.0.0.1", "--org", "org-a"])
    assert again.exit_code == 2 and "refusing to overwrite" in " ".join(again.output.split())


# -- strategy settings as options ---------------------------------------------------


def _help_lines(command: list[str]) -> list[str]:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})  # one line per option
    assert result.exit_code == 0, result.output
    return [" ".join(line.strip("│ ").split()) for line in result.output.splitlines()]


def test_simulate_offers_every_strategy_setting_with_each_owners_default():
    from fedforget.strategies.registry import setting_options

    lines = _help_lines(["simulate"])
    for option in setting_options():
        assert any(line.startswith(f"--{option} ") for line in lines), option
    expected = {
        "--recovery-rounds": "(default subtract: 3, fedrecovery: 0, gradient-ascent: 2)",
        "--calibration-ratio": "(default calibrated: 1)",
        "--calibration-interval": "(default calibrated: none)",
        "--abnormality-threshold": "(default replay: 10)",
        "--estimate": "(default replay: stored)",
        "--noise-delta": "(default fedrecovery: 1e-05)",
        "--ascent-accuracy-floor": "(default gradient-ascent: 0.3)",
    }
    for option, default in expected.items():
        (line,) = [line for line in lines if line.startswith(f"{option} ")]
        assert line.endswith(default), line


def test_a_setting_of_another_strategy_is_refused_naming_its_owner(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), "--calibration-ratio", "0.5", "--strategy", "replay"])
    assert result.exit_code == 2
    assert (
        "setting 'calibration-ratio' does not apply to strategy 'replay': it is a setting of calibrated"
        in " ".join(result.output.split())
    )
    assert not out.exists()


@pytest.fixture
def simulated(monkeypatch):
    """The configurations `fedforget simulate` would run, checked as the runner checks them first, not run."""
    from types import SimpleNamespace

    import fedforget.simulations.runner as simulation_runner

    configs = []

    def record(config, out, **_):
        config.validate()
        configs.append(config)
        return SimpleNamespace(report={}, verification=None)

    monkeypatch.setattr(simulation_runner, "simulate", record)
    return configs


def test_an_optional_setting_accepts_none(tmp_path, simulated):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--strategy", "replay",
                                 "--abnormality-threshold", "none", "--warmup-rounds", "2"])
    assert result.exit_code == 0, result.output
    (config,) = simulated
    settings = config.strategy_choice().settings()
    assert settings.abnormality_threshold is None and settings.warmup_rounds == 2
    assert config.strategy_settings == {"abnormality-threshold": None, "warmup-rounds": 2}


def test_an_optional_setting_still_checks_its_values(tmp_path, simulated):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--strategy", "fedrecovery",
                                 "--noise-epsilon", "2", "--noise-sensitivity", "0.1"])
    assert result.exit_code == 0, result.output
    assert simulated[0].strategy_choice().settings().sigma > 0  # "2" and "0.1" were read as numbers
    refused = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--strategy", "replay",
                                  "--abnormality-threshold", "huge"])
    assert refused.exit_code == 2
    assert "replay setting abnormality-threshold must be a number, got 'huge'" in " ".join(refused.output.split())
    not_optional = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--strategy", "calibrated",
                                       "--calibration-ratio", "none"])
    assert not_optional.exit_code == 2 and "Invalid value for '--calibration-ratio'" in not_optional.output
    assert len(simulated) == 1
