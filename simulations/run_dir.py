"""The directory a simulation writes into: its layout, its default name, and whether it can take a run.

Torch- and Flower-free, so ``fedforget simulate`` refuses an unusable ``--out``
before it imports either.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

from fedforget.errors import FedforgetError
from fedforget.files import ensure_writable_dir, write_json_atomic
from fedforget.simulations.config import ConfigError, SimulationConfig

STORE_DIR = "store"
REPORT_FILE = "report.json"
SETTINGS_FILE = "simulation.json"
VERIFICATION_FILE = "verification.json"

DEFAULT_PARENT = Path("runs")
DEFAULT_PREFIX = "simulation-"
"""Without ``--out``, a run goes to the first free ``runs/simulation-N``: never the demo's ``runs/demo``."""


LONGEST_CLIENTS_LABEL = 80
"""Characters of a withdrawal's clients that a file name spells out; file names end at 255 bytes."""


def clients_label(clients: list[str]) -> str:
    """How files of an unlearning name its clients: ``3``, ``1+4``; a long list by its first client, count and hash.

    A withdrawal of a hundred clients at once would otherwise name files
    longer than the file system allows, and the run would fail after all its
    training, at the evidence.
    """
    joined = "+".join(clients)
    if len(joined) <= LONGEST_CLIENTS_LABEL:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
    return f"{clients[0]}+{len(clients) - 1}-more-{digest}"


class RunDirectoryError(FedforgetError):
    """The output directory cannot be written, or holds something that is not a fedforget run."""


def next_free_run_dir(parent: Path = DEFAULT_PARENT) -> Path:
    """``parent/simulation-N`` for the smallest N ≥ 1 that does not exist yet."""
    taken = {p.name for p in parent.glob(f"{DEFAULT_PREFIX}*")} if parent.is_dir() else set()
    number = 1
    while f"{DEFAULT_PREFIX}{number}" in taken:
        number += 1
    return parent / f"{DEFAULT_PREFIX}{number}"


def run_dirs(config: SimulationConfig, out: Path) -> list[tuple[SimulationConfig, Path]]:
    """Each seed's settings and directory: ``OUT`` itself for one seed, ``OUT/seed-S`` for several."""
    if config.seeds == 1:
        return [(config, out)]
    return [
        (replace(config, seed=config.seed + i, seeds=1), out / f"seed-{config.seed + i}")
        for i in range(config.seeds)
    ]


def check_can_create(out: Path) -> None:
    """Refuse an ``out`` that cannot become a writable directory, without creating anything.

    A quick look (the nearest existing ancestor must be a writable directory);
    :func:`writable` proves it by writing when the run really starts.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"output directory {out} is not writable: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"output directory {out} is not writable: no write permission on {existing}")


def writable(out: Path) -> Path:
    """``out``, created if needed and proved writable (resolved), or :class:`RunDirectoryError`."""
    try:
        return ensure_writable_dir(out)
    except PermissionError as exc:
        raise RunDirectoryError(str(exc)) from exc


def check_fresh(config: SimulationConfig, out: Path) -> None:
    """Refuse an ``OUT`` that already holds a run (it would be mixed with this one)."""
    held = [d for _, d in run_dirs(config, out) if (d / STORE_DIR).exists() and any((d / STORE_DIR).iterdir())]
    if (out / SETTINGS_FILE).exists() or held:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def record_settings(config: SimulationConfig, out: Path) -> None:
    """Write ``OUT/simulation.json``: what ``--resume`` reads back (the only write before training)."""
    write_json_atomic(out / SETTINGS_FILE, config.to_json())


def saved_config(out: Path) -> SimulationConfig:
    """The settings of the run in ``OUT``, for ``--resume``."""
    path = out / SETTINGS_FILE
    if not path.exists():
        raise RunDirectoryError(f"--resume: {out} holds no fedforget simulation to resume ({path} is missing)")
    try:
        return SimulationConfig.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise RunDirectoryError(f"--resume: cannot read the run's settings {path}: {exc}") from exc
