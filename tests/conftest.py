"""Shared test set-up: quiet, single-threaded, offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray reads these when first imported: any Ray a test starts listens on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import torch  # noqa: E402

torch.set_num_threads(1)

# tests/ helpers (e.g. local_grid) are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
