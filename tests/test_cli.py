"""The command line: every command has --help showing its defaults; bad input fails fast, clearly, with its own exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from fedforget.cli import app
from fedforget.commands import simulate as simulate_module
from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail, run

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "command",
    [
        [], ["simulate"], ["bench"], ["bench", "overhead"], ["bench", "unlearning"], ["bench", "shards"], ["client"], ["client", "verify"],
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
        (["--store-dtype", "int4"], "--store-dtype 'int4' is not known"),
        (["--clients", "2", "--withdraw", "0@2", "--withdraw", "1@2"], "at least one client must remain"),
        (["--clients", "4", "--backdoor", "9"], "--backdoor 9: there is no client '9'"),
        (["--backdoor-fraction", "1.5"], "--backdoor-fraction must be in (0, 1]"),
        (["--backdoor-target", "10"], "--backdoor-target must be a class 0..9"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--shards", "0"], "--shards must be at least 1"),
        (["--clients", "4", "--shards", "5"], "--shards 5 is more than the 4 clients"),
        (["--shards", "2", "--seeds", "2"], "--shards with --seeds is not supported"),
    ],
)
def test_bad_simulation_settings_fail_before_writing(tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), *args])
    assert result.exit_code == ExitCode.USAGE
    assert message in result.output
    assert not out.exists()


def test_unwritable_output_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["simulate", "--out", str(blocker / "run"), "--rounds", "1"])
    assert result.exit_code == ExitCode.BAD_FILE
    assert "is not writable" in result.output and str(blocker) in result.output
    assert blocker.read_text() == "not a directory"


def test_resume_without_a_run_is_refused(tmp_path):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "nothing"), "--resume"])
    assert result.exit_code == ExitCode.BAD_FILE
    assert "holds no fedforget simulation to resume" in result.output


def test_resume_needs_the_run_named():
    result = runner.invoke(app, ["simulate", "--resume"])
    assert result.exit_code == ExitCode.USAGE and "--resume continues the run in --out" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--dataset", "nope"],
        ["simulate", "--withdraw", "99@3"],
        ["simulate", "--lr", "-1"],
        ["simulate", "--out", "{a_file}/run"],
        ["export-data", "--out", "/tmp/x", "--partitions", "2", "--dataset", "nope"],
        ["client", "verify", "--model", "m.npz", "--data", "d.npz", "--holdout", "h.npz"],
    ],
)
def test_bad_input_is_refused_before_torch_or_flower_is_imported(tmp_path, args):
    """The property behind sub-second rejection: nothing heavy is imported to say no."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    args = [arg.replace("{a_file}", str(a_file)) for arg in args]
    probe = (
        "import sys\n"
        "from fedforget.cli import main\n"
        f"sys.argv = ['fedforget', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'flwr', 'ray', 'grpc') if m in sys.modules)\n"
        "print('EXIT', code, 'HEAVY', ','.join(heavy) or '-')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    exit_code, heavy = re.search(r"EXIT (\d+) HEAVY (\S+)", done.stdout).groups()  # type: ignore[union-attr]
    assert exit_code in {str(ExitCode.USAGE.value), str(ExitCode.BAD_FILE.value)}, done.stdout + done.stderr
    assert "error:" in done.stderr
    assert heavy == "-", f"imported {heavy} before refusing {args}"


def _options(command: list[str]) -> list[str]:
    group = get_command(app)
    for name in command:
        group = group.commands[name]  # type: ignore[attr-defined]
    return [p.opts[0] for p in group.params if p.opts[0].startswith("--") and not getattr(p, "required", False)]


@pytest.mark.parametrize("command", [["simulate"], ["bench", "overhead"], ["client", "verify"], ["export-data"]])
def test_help_shows_every_default(command):
    optional = _options(command)
    shown = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert shown.count("[default:") == len(optional), shown


def test_simulate_help_shows_each_dataset_s_training_defaults():
    from fedforget.simulations.config import DATASET_TRAINING

    shown = " ".join(runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output.split())
    for dataset, defaults in DATASET_TRAINING.items():
        assert dataset in shown
        for value in (defaults.lr, defaults.batch_size, defaults.local_epochs):
            assert f"{value:g}" in shown


@pytest.fixture
def planned_runs(monkeypatch):
    """Calls to the simulation engine, recorded instead of run."""
    calls = []
    monkeypatch.setattr(simulate_module, "_run", lambda config, out, **kw: calls.append((config, out)))
    return calls


def test_the_default_output_is_a_new_directory_never_the_demo_s(tmp_path, monkeypatch, planned_runs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert runner.invoke(app, ["simulate"]).exit_code == 0
    (tmp_path / "runs" / "simulation-1").mkdir()  # as the run planned would have
    assert runner.invoke(app, ["simulate"]).exit_code == 0
    assert [out for _, out in planned_runs] == [
        tmp_path / "runs" / "simulation-1", tmp_path / "runs" / "simulation-2"
    ]


def test_each_dataset_trains_with_its_own_defaults_unless_told_otherwise(tmp_path, planned_runs):
    runner.invoke(app, ["simulate", "--dataset", "digits", "--out", str(tmp_path / "a")])
    runner.invoke(app, ["simulate", "--dataset", "mnist", "--out", str(tmp_path / "b")])
    runner.invoke(app, ["simulate", "--dataset", "mnist", "--lr", "0.07", "--out", str(tmp_path / "c")])
    digits, mnist, told = (config for config, _ in planned_runs)
    assert (digits.lr, digits.batch_size, digits.local_epochs) == (0.1, 16, 2.0)
    assert (mnist.lr, mnist.batch_size, mnist.local_epochs) == (0.02, 32, 1.0)
    assert (told.lr, told.batch_size) == (0.07, 32)


def test_a_model_factory_s_training_defaults_replace_the_dataset_s(tmp_path, planned_runs):
    result = runner.invoke(app, ["simulate", "--model", "toy_models:linear_digits", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    (config, _), = planned_runs
    assert (config.model, config.lr, config.batch_size, config.local_epochs) == ("toy_models:linear_digits", 0.3, 8, 2.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("toy_models:negative_lr", "training_defaults['lr'] must be a positive number"),
        ("toy_models:nothing_here", "cannot be loaded"),
        ("digits", "unknown model 'digits': choose one of resnet-small"),
    ],
)
def test_an_unusable_model_factory_is_a_usage_error(tmp_path, planned_runs, spec, message):
    result = runner.invoke(app, ["simulate", "--model", spec, "--out", str(tmp_path / "run")])
    assert result.exit_code == ExitCode.USAGE and message in result.output
    assert not planned_runs


def test_exit_codes_are_distinct_and_documented_in_the_readme():
    values = [code.value for code in ExitCode]
    assert len(set(values)) == len(values)
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| `(\d+)` \|", section, flags=re.MULTILINE)}
    assert documented == set(values)


def test_an_unhandled_exception_is_reported_as_a_bug_with_its_own_code(capsys):
    broken = typer.Typer()

    @broken.command()
    def explode() -> None:
        raise KeyError("no such thing")

    with pytest.raises(SystemExit) as stopped:
        run(broken, prog_name="broken", args=[])
    assert stopped.value.code == ExitCode.INTERNAL
    assert "KeyError" in capsys.readouterr().err


def test_piped_output_is_never_wrapped():
    sentence = "word " * 60
    shown = CliRunner().invoke(_failing_app(sentence), []).output
    assert sentence.strip() in shown
    assert console().width >= 200  # CliRunner's output is no terminal


def _failing_app(message: str) -> typer.Typer:
    failing = typer.Typer()

    @failing.command()
    def refuse() -> None:
        fail(message, ExitCode.USAGE)

    return failing


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
    assert result.exit_code == ExitCode.USAGE
    assert "clients: 3 -> 5" in result.output


def test_resume_may_change_the_strategy_until_a_first_unlearning_completes(tmp_path):
    """After subtract refused a withdrawal, the run goes on with retrain; once a strategy has unlearned, it stays."""
    from fedforget.client.app import model_arrays
    from fedforget.server.store.history_store import HistoryStore
    from fedforget.server.unlearning.events import UNLEARNING_KIND
    from fedforget.simulations.config import ConfigError, SimulationConfig
    from fedforget.simulations.models import build_model
    from fedforget.simulations.run_dir import saved_config
    from fedforget.simulations.runner import prepare_output

    out = tmp_path / "run"
    subtract = SimulationConfig(clients=3, rounds=4, strategy="subtract", strategy_settings={"max-stage-steps": 2.0})
    _store_of(out, subtract)
    retrain = SimulationConfig(clients=3, rounds=4, strategy="retrain")
    prepare_output(retrain, out, resume=True)
    assert saved_config(out).strategy == "retrain" and saved_config(out).strategy_settings == {}  # goes on with it

    with pytest.raises(ConfigError, match="clients: 3 -> 5"):  # anything else still has to match
        prepare_output(SimulationConfig(clients=5, rounds=4, strategy="subtract"), out, resume=True)

    with HistoryStore.open(out / "store") as store:
        store.write_initial_model(model_arrays(build_model("digits", seed=0)))
        unlearned = store.fork(base_version=0, info={})
        store.set_trajectory_status(unlearned, "complete", info={"kind": UNLEARNING_KIND, "clients": ["1"]})
    with pytest.raises(ConfigError, match="strategy: 'retrain' -> 'subtract'.*until a first unlearning completes"):
        prepare_output(subtract, out, resume=True)
    assert saved_config(out).strategy == "retrain"


def test_resume_of_a_store_from_another_federation_or_model_is_refused(tmp_path):
    import numpy as np

    from fedforget.simulations.config import SimulationConfig

    config = SimulationConfig(clients=3, rounds=4)
    _store_of(tmp_path / "other-federation", config, federation_id="hospital-consortium")
    result = runner.invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "other-federation")])
    assert result.exit_code == ExitCode.BAD_FILE
    assert "hospital-consortium" in result.output

    _store_of(tmp_path / "other-model", config, model={"w": np.zeros((3, 3), np.float32)})
    result = runner.invoke(app, ["simulate", "--resume", "--out", str(tmp_path / "other-model")])
    assert result.exit_code == ExitCode.BAD_FILE
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
    assert again.exit_code == ExitCode.USAGE and "refusing to overwrite" in again.output


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
        "--recovery-rounds": "[default: (subtract: 3, fedrecovery: 0, gradient-ascent: 2, relabel: 2, misdirect: 2)]",
        "--calibration-ratio": "[default: (calibrated: 1)]",
        "--calibration-interval": "[default: (calibrated: none)]",
        "--abnormality-threshold": "[default: (replay: 10)]",
        "--estimate": "[default: (replay: stored)]",
        "--noise-delta": "[default: (fedrecovery: 1e-05)]",
        "--ascent-accuracy-floor": "[default: (gradient-ascent: 0.3)]",
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


def test_a_named_model_brings_its_training_defaults(tmp_path, planned_runs):
    result = runner.invoke(app, ["simulate", "--dataset", "mnist", "--model", "resnet-small", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    (config, _), = planned_runs
    assert (config.model, config.lr, config.batch_size, config.local_epochs) == ("resnet-small", 0.01, 32, 1)


def test_a_strategy_that_refuses_exits_2_and_says_how_to_go_on(tmp_path, monkeypatch):
    import fedforget.simulations.runner as simulation_runner
    from fedforget.strategies.subtract import SubtractDoesNotPayError

    def refusing(config, out, **_):
        raise SubtractDoesNotPayError("subtract would need 87 stages; unlearn with the retrain strategy.")

    monkeypatch.setattr(simulation_runner, "simulate", refusing)
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), "--strategy", "subtract", "--withdraw", "0@2"])
    assert result.exit_code == ExitCode.USAGE
    said = " ".join(result.output.split())
    assert "subtract would need 87 stages" in said
    assert f"fedforget simulate --resume --out {out} --strategy retrain" in said.replace("\n", "")
