"""The settings of a deployed run, read from Flower's run config (``flwr run ... --run-config``).

Under ``flwr run`` the ServerApp runs in a process of its own that receives
nothing but ``context.run_config``: the defaults come from
``[tool.flwr.app.config]`` in ``pyproject.toml`` and the operator overrides
them per run. Every key is checked here, before anything is written, so a typo
fails the run at once with a message naming the key instead of training with a
default the operator did not mean.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedforget.errors import FedforgetError
from fedforget.privacy import PrivacyError, PrivacySettings
from fedforget.server.state_dir import StateDir
from fedforget.server.store.update_encoding import UPDATE_ENCODING_HELP, UpdateEncoding

UNLEARNING_PREFIX = "unlearning."
"""Strategy settings live under ``[tool.flwr.app.config.unlearning]`` (``unlearning.calibration-ratio``):
the same names as the CLI's options, derived from each strategy's settings dataclass."""


class RunConfigError(FedforgetError):
    """The run config is missing a key or holds a value of the wrong kind."""


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployed run, as the ServerApp and the ClientApps read it from the run config."""

    state_dir: Path
    """Where the run keeps its history store, consent registry, ledger and certificates."""
    federation_id: str
    """The id signed withdrawal requests and certificates name; the withdrawal service uses the same."""
    signing_key: Path
    """The federation's private key (``fedforget certs``: federation.key) that signs certificates."""
    dataset: str = "digits"
    """The built-in dataset whose architecture the model has (unless ``model`` names one) and whose
    test split the server evaluates on."""
    model: str = ""
    """Your own architecture, ``package.module:function`` returning an ``nn.Module`` (installed on every party)."""
    num_rounds: int = 5
    strategy: str = "retrain"
    local_epochs: float = 1.0
    lr: float = 0.1
    batch_size: int = 16
    seed: int = 0
    min_nodes: int = 1
    """Nodes that must be connected before round 1; withdrawn organisations no longer count."""
    round_timeout: float = 600.0
    resume: bool = False
    """Continue the run whose history is in ``state_dir`` (after a crash or a stop)."""
    store_dtype: str = "float16"
    retention_interval: int = 1
    evaluate: bool = True
    """Evaluate each global model on the built-in dataset's test split (server side)."""
    audit_retention_days: float = 0.0
    """Keep the old global models trained with a withdrawn client this long for audits (0: shred them at once)."""
    unlearning: Mapping[str, object] = field(default_factory=dict)
    """Strategy settings by their run-config names (``calibration-ratio``, ...)."""
    fraction_train: float = 1.0
    """Share of the consenting organisations Flower samples for each round; 1: all of them.
    The draw is seeded by ``seed`` and the round, so a resumed run samples as the first one did."""
    shards: int = 1
    """Isolated shards (SISA) the organisations are split into, one model each, served as their ensemble;
    a withdrawal retrains only its shard. 1: unsharded. At most ``min-nodes``."""
    dp: str = ""
    """Differentially private training: central-fixed, central-adaptive or local ("": none)."""
    noise_multiplier: float = 0.0
    """z of the DP mechanism (required with ``dp``)."""
    clipping_norm: float = 0.0
    """C of the DP mechanism (required with ``dp``; the initial one under central-adaptive)."""

    def privacy(self) -> PrivacySettings | None:
        """The run's DP settings, or None."""
        return PrivacySettings(self.dp, self.noise_multiplier, self.clipping_norm) if self.dp else None

    @property
    def model_spec(self) -> str:
        """What :func:`fedforget.simulations.models.build_model` builds: ``model``, else the dataset's."""
        return self.model or self.dataset

    @property
    def state(self) -> StateDir:
        """The files in ``state_dir``: store, consent registry, ledger, certificates, report."""
        return StateDir(self.state_dir)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> DeploymentConfig:
        """Parse and check Flower's run config; raise :class:`RunConfigError` naming every bad key."""
        reader = _Reader(run_config)
        config = cls(
            state_dir=reader.path("state-dir"),
            federation_id=reader.text("federation-id"),
            signing_key=reader.path("signing-key"),
            dataset=reader.text("dataset", cls.dataset),
            model=reader.text("model", cls.model),
            num_rounds=reader.integer("num-rounds", cls.num_rounds, minimum=1),
            strategy=reader.text("strategy", cls.strategy),
            local_epochs=reader.number("local-epochs", cls.local_epochs, minimum=0.0),
            lr=reader.number("lr", cls.lr, minimum=0.0),
            batch_size=reader.integer("batch-size", cls.batch_size, minimum=1),
            seed=reader.integer("seed", cls.seed, minimum=0),
            min_nodes=reader.integer("min-nodes", cls.min_nodes, minimum=1),
            round_timeout=reader.number("round-timeout", cls.round_timeout, minimum=0.0),
            resume=reader.flag("resume", cls.resume),
            store_dtype=reader.text("store-dtype", cls.store_dtype),
            retention_interval=reader.integer("retention-interval", cls.retention_interval, minimum=1),
            evaluate=reader.flag("evaluate", cls.evaluate),
            audit_retention_days=reader.number("audit-retention-days", cls.audit_retention_days, minimum=0.0),
            unlearning=reader.unlearning(),
            shards=reader.integer("shards", cls.shards, minimum=1),
            fraction_train=reader.number("fraction-train", cls.fraction_train, minimum=0.0),
            dp=reader.text("dp", cls.dp),
            noise_multiplier=reader.number("noise-multiplier", cls.noise_multiplier, minimum=0.0),
            clipping_norm=reader.number("clipping-norm", cls.clipping_norm, minimum=0.0),
        )
        reader.check_choices(config)
        reader.raise_errors()
        return config


class _Reader:
    """Collects every problem in the run config so that one failed run names them all."""

    _KNOWN = {
        "state-dir", "federation-id", "signing-key", "dataset", "model", "num-rounds", "strategy", "local-epochs",
        "lr", "batch-size", "seed", "min-nodes", "round-timeout", "resume", "store-dtype",
        "retention-interval", "evaluate", "audit-retention-days", "shards", "fraction-train", "dp",
        "noise-multiplier", "clipping-norm",
    }

    def __init__(self, run_config: Mapping[str, object]) -> None:
        self._config = dict(run_config)
        self._errors: list[str] = []
        unknown = sorted(
            k for k in self._config if k not in self._KNOWN and not k.startswith(UNLEARNING_PREFIX)
        )
        if unknown:
            self._errors.append(f"unknown keys {unknown} (known: {sorted(self._KNOWN)} and unlearning.*)")

    def _get(self, key: str, default: object) -> object:
        value = self._config.get(key, default)
        if value is _REQUIRED or value == "":
            if default is _REQUIRED:
                self._errors.append(f"{key} is required: pass it with --run-config \"{key}='...'\"")
            return default
        return value

    def text(self, key: str, default: object = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if value is _REQUIRED:
            return ""
        if not isinstance(value, str):
            self._errors.append(f"{key} must be a string, got {value!r}")
            return ""
        return value

    def path(self, key: str) -> Path:
        value = self.text(key)
        if value and not os.path.isabs(value):
            self._errors.append(
                f"{key} must be an absolute path ({value!r} is relative, and the ServerApp's working "
                "directory is the SuperLink's, not yours)"
            )
        return Path(value)

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self._errors.append(f"{key} must be an integer, got {value!r}")
            return default
        if value < minimum:
            self._errors.append(f"{key} must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._errors.append(f"{key} must be a number, got {value!r}")
            return default
        if value < minimum:
            self._errors.append(f"{key} must be at least {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self._errors.append(f"{key} must be true or false, got {value!r}")
            return default
        return value

    def unlearning(self) -> dict[str, object]:
        """The ``unlearning.*`` keys by option name; whether they fit the strategy is checked with it."""
        return {
            key[len(UNLEARNING_PREFIX):]: value for key, value in self._config.items() if key.startswith(UNLEARNING_PREFIX)
        }

    def check_choices(self, config: DeploymentConfig) -> None:
        from fedforget.simulations.datasets import DATASET_NAMES
        from fedforget.strategies.registry import StrategyChoice
        from fedforget.strategies.settings import SettingsError

        if config.dataset not in DATASET_NAMES:
            self._errors.append(f"dataset must be one of {list(DATASET_NAMES)}, got {config.dataset!r}")
        if config.model and ":" not in config.model:
            self._errors.append(f"model must be package.module:function, got {config.model!r}")
        try:
            StrategyChoice(config.strategy, dict(config.unlearning))
        except SettingsError as exc:
            self._errors.append(f"strategy / unlearning.*: {exc}")
        if config.shards > config.min_nodes:
            self._errors.append(
                f"shards ({config.shards}) must be at most min-nodes ({config.min_nodes}): the shards are formed "
                "from the organisations connected at the start, and every shard needs one"
            )
        if not 0 < config.fraction_train <= 1:
            self._errors.append(
                f"fraction-train must be in (0, 1] (the share of organisations sampled per round), "
                f"got {config.fraction_train}"
            )
        if config.dp:
            try:
                config.privacy()
            except PrivacyError as exc:
                self._errors.append(f"dp / noise-multiplier / clipping-norm: {exc}")
            if config.shards > 1:
                self._errors.append("dp with shards > 1 is not supported: each shard would be its own DP release")
        elif config.noise_multiplier or config.clipping_norm:
            self._errors.append("noise-multiplier and clipping-norm set differential privacy up: give dp too")
        try:
            UpdateEncoding.parse(config.store_dtype)
        except ValueError:
            self._errors.append(f"store-dtype must be {UPDATE_ENCODING_HELP}, got {config.store_dtype!r}")

    def raise_errors(self) -> None:
        if self._errors:
            raise RunConfigError("invalid run config: " + "; ".join(self._errors))


_REQUIRED = object()
