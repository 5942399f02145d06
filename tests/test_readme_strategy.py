"""The README's "write your own strategy" example, pasted as it stands, registers and unlearns.

It runs in a subprocess: registering a strategy changes the process-wide
registry (and so every command's options), which other tests must not see.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

CHECK = '''
import sys
sys.path.insert(0, {tests!r})
from local_grid import LocalGrid

from fedforget.client.app import make_client_app, model_arrays
from fedforget.server.rounds.loop import FederatedRun, RunSettings
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import data_settings
from fedforget.simulations.task import SimulationTask
from fedforget.strategies.registry import StrategyChoice, setting_options, strategy_names

assert "fine-tune" in strategy_names()
assert setting_options()["recovery-rounds"].defaults["fine-tune"] == 2

config = SimulationConfig(clients=3, rounds=3, local_epochs=0.5)
initial = model_arrays(build_model("digits", seed=0))
grid = LocalGrid(make_client_app(SimulationTask(data_settings(config))), 3)
store = HistoryStore.create({store!r}, federation_id="f", model_spec=ModelSpec.from_arrays(initial))
strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
unlearner = StrategyChoice("fine-tune", {{"recovery-rounds": 3}}).build(config.unlearning_context())
run = FederatedRun(grid, store, strategy, unlearner,
                   RunSettings(num_rounds=3, train_config={{"local-epochs": 0.5, "lr": 0.1, "batch-size": 16}}))
run.execute(initial)
source = store.current_trajectory()
strategy.exclude(["1"])
outcome, _, trajectory = run.run_unlearner(unlearner, ["1"], 3, source)
assert trajectory != source
assert outcome.round_trips == 3, outcome.round_trips
reader = store.reader(trajectory)
(last,) = list(reader.rounds(3, 3))
assert last.participants == [], "the unlearned round must show no participant, the withdrawn client least of all"
assert max(abs(float((outcome.model[k] - reader.model(3)[k]).max())) for k in outcome.model) == 0.0
print("ok")
'''


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    marker = "<!-- strategies: custom -->\n```python\n"
    assert marker in text, "the README lost its custom-strategy example"
    return text.split(marker, 1)[1].split("```", 1)[0]


def test_the_readme_custom_strategy_registers_and_unlearns_without_the_client(tmp_path: Path) -> None:
    script = _example() + CHECK.format(tests=str(Path(__file__).parent), store=str(tmp_path / "store"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
