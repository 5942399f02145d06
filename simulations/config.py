"""Settings of a simulated federation, checked before anything is written."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from fedforget.evidence.backdoor import Trigger
from fedforget.server.store.errors import FedforgetError
from fedforget.server.rounds.loop import Withdrawal
from fedforget.simulations.datasets import DATASET_NAMES
from fedforget.simulations.models import SeededModelFactory
from fedforget.simulations.partitioning import PARTITION_SCHEMES
from fedforget.strategies.registry import StrategyChoice
from fedforget.strategies.settings import SettingsError, UnlearningContext

STORE_DTYPES = ("float32", "float16")
NUM_CLASSES = 10  # every built-in dataset has ten classes


class ConfigError(FedforgetError, ValueError):
    """A simulation setting is invalid; the message names it and what is allowed."""


_WITHDRAWAL = re.compile(r"^(?P<client>[^@\s]+)@(?P<round>\d+)$")


def parse_withdrawal(text: str) -> Withdrawal:
    """Parse ``CLIENT@ROUND`` (e.g. ``3@5``: client 3 withdraws before round 5)."""
    match = _WITHDRAWAL.match(text.strip())
    if match is None:
        raise ConfigError(f"--withdraw {text!r}: expected CLIENT@ROUND, e.g. 3@5")
    return Withdrawal(client_id=match["client"], round=int(match["round"]))


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated federation: data, training, history and withdrawals."""

    dataset: str = "digits"
    clients: int = 10
    rounds: int = 10
    local_epochs: float = 2.0
    partition: str = "iid"
    alpha: float = 0.5
    train_fraction: float = 1.0
    """Share of the training set the federation holds (a seeded subsample): faster runs."""
    classes_per_partition: int = 2
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 16
    strategy: str = "retrain"
    withdrawals: tuple[Withdrawal, ...] = field(default_factory=tuple)
    retention_interval: int = 1
    store_dtype: str = "float32"
    backdoors: tuple[str, ...] = field(default_factory=tuple)
    """Clients that plant a BadNets-style canary: evidence of forgetting is measurable."""
    backdoor_fraction: float = 0.7
    backdoor_target: int = 0
    shadows: int = 8
    """Shadow models for the per-example membership attack (offline LiRA); 0 skips it."""
    seeds: int = 1
    """Repeat the whole run over seeds ``seed .. seed + seeds - 1`` (the retrain band)."""
    strategy_settings: dict[str, object] = field(default_factory=dict)
    """The chosen strategy's settings given explicitly, by option name (the rest are its defaults)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        _one_of("--dataset", self.dataset, DATASET_NAMES)
        _one_of("--partition", self.partition, PARTITION_SCHEMES)
        try:
            self.strategy_choice()
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None
        _one_of("--store-dtype", self.store_dtype, STORE_DTYPES)
        _at_least("--clients", self.clients, 1)
        _at_least("--rounds", self.rounds, 1)
        _at_least("--retention-interval", self.retention_interval, 1)
        _at_least("--batch-size", self.batch_size, 1)
        if self.local_epochs <= 0:
            raise ConfigError(f"--local-epochs must be positive, got {self.local_epochs}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.alpha <= 0:
            raise ConfigError(f"--alpha must be positive, got {self.alpha}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        client_ids = {str(i) for i in range(self.clients)}
        withdrawn: set[str] = set()
        for w in self.withdrawals:
            if w.client_id not in client_ids:
                raise ConfigError(
                    f"--withdraw {w.client_id}@{w.round}: there is no client {w.client_id!r}; "
                    f"this federation's clients are 0..{self.clients - 1}"
                )
            if not 1 <= w.round <= self.rounds:
                raise ConfigError(
                    f"--withdraw {w.client_id}@{w.round}: the round must be between 1 and the last "
                    f"round, {self.rounds}"
                )
            if w.client_id in withdrawn:
                raise ConfigError(f"--withdraw: client {w.client_id} is withdrawn more than once")
            withdrawn.add(w.client_id)
        if len(withdrawn) >= self.clients:
            raise ConfigError("--withdraw: at least one client must remain in the federation")
        for client in self.backdoors:
            if client not in client_ids:
                raise ConfigError(
                    f"--backdoor {client}: there is no client {client!r}; "
                    f"this federation's clients are 0..{self.clients - 1}"
                )
        if len(set(self.backdoors)) != len(self.backdoors):
            raise ConfigError("--backdoor: a client is named more than once")
        if not 0 < self.backdoor_fraction <= 1:
            raise ConfigError(f"--backdoor-fraction must be in (0, 1], got {self.backdoor_fraction}")
        if not 0 <= self.backdoor_target < NUM_CLASSES:
            raise ConfigError(f"--backdoor-target must be a class 0..{NUM_CLASSES - 1}, got {self.backdoor_target}")
        _at_least("--shadows", self.shadows, 0)
        if self.strategy == "gradient-ascent" and len({w.round for w in self.withdrawals}) != len(self.withdrawals):
            raise ConfigError("--strategy gradient-ascent unlearns one client at a time: give each its own round")
        _at_least("--seeds", self.seeds, 1)

    def strategy_choice(self) -> StrategyChoice:
        """The unlearning strategy and the settings given for it."""
        return StrategyChoice(self.strategy, dict(self.strategy_settings))

    def unlearning_context(self) -> UnlearningContext:
        """What this federation tells its strategies: its E, its Δt and how to build its model."""
        return UnlearningContext(
            local_epochs=float(self.local_epochs),
            retention_interval=int(self.retention_interval),
            model_factory=SeededModelFactory(self.dataset, seed=self.seed),
        )

    def trigger(self) -> Trigger:
        """The canary: a bright square in the top-left corner (dark in every class), relabelled to the target.

        On digits, with one backdoored client in ten, a 3x3 patch on 70 % of its
        examples reaches a success rate above 90 % within about 12 rounds.
        """
        return Trigger(
            target_class=self.backdoor_target, size=3 if self.dataset == "digits" else 4, corner="top-left"
        )

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["withdrawals"] = [f"{w.client_id}@{w.round}" for w in self.withdrawals]
        data["backdoors"] = list(self.backdoors)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SimulationConfig:
        fields = dict(data)
        fields["withdrawals"] = tuple(parse_withdrawal(str(w)) for w in fields.get("withdrawals", []))  # type: ignore[union-attr]
        fields["backdoors"] = tuple(str(c) for c in fields.get("backdoors", []))  # type: ignore[union-attr]
        # Runs stored before strategy settings had their own dataclasses kept them as flat fields.
        legacy = {key: fields.pop(key) for key in _LEGACY_STRATEGY_FIELDS if key in fields}
        if legacy and fields.get("strategy") == "subtract":
            fields["strategy"] = "fedrecovery"  # "subtract" named FedRecovery before it was renamed
        if legacy:
            settings = StrategyChoice(str(fields.get("strategy", "retrain"))).settings().to_json()
            fields["strategy_settings"] = {
                key.replace("_", "-"): value for key, value in legacy.items() if key in settings and value is not None
            }
        return cls(**fields)  # type: ignore[arg-type]


_LEGACY_STRATEGY_FIELDS = (
    "calibration_ratio", "calibration_norm", "recovery_rounds", "noise_epsilon", "noise_sensitivity",
    "ascent_accuracy_floor",
)


def _one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r} is not known; choose one of: {', '.join(allowed)}")


def _at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, got {value}")
