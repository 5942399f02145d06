"""``fedforget bench estimation``: how well can a stored update stand in for a client's real one?

History replay (FedRecover) rests on one premise: a remaining client's update
at the model being rebuilt, U(ŵ), can be estimated from its stored update at
the original model, Ū = U(w̄), either as it is or corrected by an
approximation of the integrated Hessian, U(ŵ) ≈ Ū − H (ŵ − w̄). A store in
which one history was recorded and then retrained without a client holds
both sides of that premise for every round and remaining client: the
original trajectory has Ū at w̄, the retrain's has the real U(ŵ) at ŵ. This
command measures, round by round, the relative error ‖Û − U(ŵ)‖ / ‖U(ŵ)‖ of

* ``stored``: Û = Ū;
* ``best-scalar``: Û = Ū − κ s with s = ŵ − w̄ and the κ that fits this very
  round best (an oracle: no estimator of the form "scalar Jacobian" can do better);
* ``lbfgs``: Û = Ū − B s with B the L-BFGS matrix of the client's two
  previous rounds' pairs (s, −(U(ŵ) − Ū)), as FedRecover builds it from its
  exact rounds (here every earlier round is treated as exact: its best case).

Run it on a store that ``fedforget bench unlearning`` kept (each run
directory under its ``--out`` holds one), or on any simulation that was
unlearned with ``retrain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedforget.server.store.history_store import HistoryStore
from fedforget.strategies.lbfgs import CurvatureMemory
from fedforget.strategies.toolkit import difference, flatten, float_names


@dataclass(frozen=True)
class RoundErrors:
    """Mean relative errors over the remaining clients of one round."""

    round: int
    distance: float
    """‖ŵ − w̄‖ at the start of the round."""
    stored: float
    best_scalar: float | None
    lbfgs: float | None


def estimation_errors(store_dir: Path, *, memory: int = 2) -> tuple[list[RoundErrors], dict[str, object]]:
    """Per-round estimation errors along the retrain recorded in ``store_dir`` (see the module docstring)."""
    with HistoryStore.open(store_dir) as store:
        trajectories = store.trajectories()
        root = next((t for t in trajectories if t.parent is None), None)
        retrains = [t for t in trajectories if t.info.get("strategy") == "retrain" and t.parent == (root.id if root else None)]
        if root is None or not retrains:
            raise ValueError(
                f"{store_dir} holds no retrain of its original history; use a store kept by "
                "`fedforget bench unlearning`, or one a simulation unlearned with --strategy retrain"
            )
        retrain = retrains[0]
        withdrawn = {str(c) for c in retrain.info.get("clients", [])}  # type: ignore[union-attr]
        original, rebuilt = store.reader(root.id), store.reader(retrain.id)
        first = retrain.base_version + 1
        rebuilt_rounds = {view.round: view for view in rebuilt.rounds(first)}
        names: list[str] = []
        memories: dict[str, CurvatureMemory] = {}
        rows: list[RoundErrors] = []
        for view in original.rounds(first):
            mine = rebuilt_rounds.get(view.round)
            if mine is None:
                break
            before = view.model_before()
            names = names or float_names(before)
            s = flatten(difference(mine.model_before(), before), names)
            stored_errors, scalar_errors, lbfgs_errors = [], [], []
            staying = {p.client_id for p in mine.participants if p.retained} - withdrawn
            for info in view.participants:
                if info.client_id not in staying or not info.retained:
                    continue
                stored = flatten(view.update(info.client_id), names)
                real = flatten(mine.update(info.client_id), names)
                scale = float(np.linalg.norm(real)) or 1.0
                gap = real - stored
                stored_errors.append(float(np.linalg.norm(gap)) / scale)
                if np.any(s):
                    kappa = -float(gap @ s) / float(s @ s)
                    scalar_errors.append(float(np.linalg.norm(stored - kappa * s - real)) / scale)
                    held = memories.get(info.client_id)
                    if held is not None and len(held):
                        lbfgs_errors.append(float(np.linalg.norm(stored - held.product(s) - real)) / scale)
                    memories.setdefault(info.client_id, CurvatureMemory(memory)).add(s, -gap)
            if stored_errors:
                rows.append(
                    RoundErrors(
                        round=view.round,
                        distance=float(np.linalg.norm(s)),
                        stored=float(np.mean(stored_errors)),
                        best_scalar=float(np.mean(scalar_errors)) if scalar_errors else None,
                        lbfgs=float(np.mean(lbfgs_errors)) if lbfgs_errors else None,
                    )
                )
        return rows, {"withdrawn": sorted(withdrawn), "original_trajectory": root.id, "retrain_trajectory": retrain.id}


def run_estimation_benchmark(store_dir: Path, out: Path | None = None, console: object | None = None) -> dict[str, object]:
    """Print the per-round errors as a table; write them to ``OUT/bench-estimation.json`` when asked."""
    from rich.console import Console
    from rich.table import Table

    from fedforget.files import ensure_writable_dir, write_json_atomic

    rows, meta = estimation_errors(store_dir)
    shown = console if isinstance(console, Console) else Console()
    table = Table(
        title=f"Estimating remaining clients' updates on the retrain's models (client {', '.join(meta['withdrawn'])} "  # type: ignore[arg-type]
        "withdrawn): mean relative error ‖Û − U(ŵ)‖ / ‖U(ŵ)‖",
        caption="stored: Û = Ū; best scalar: Ū − κ(ŵ − w̄) with this round's best κ; "
        "lbfgs: Ū − B(ŵ − w̄), B from the two previous rounds' exact pairs",
    )
    for column in ("round", "‖ŵ − w̄‖", "stored", "best scalar", "lbfgs"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.round), f"{row.distance:.3f}", f"{row.stored:.3f}",
            "" if row.best_scalar is None else f"{row.best_scalar:.3f}",
            "" if row.lbfgs is None else f"{row.lbfgs:.3f}",
        )
    shown.print(table)
    document: dict[str, object] = {**meta, "store": str(store_dir), "rounds": [row.__dict__ for row in rows]}
    if out is not None:
        write_json_atomic(ensure_writable_dir(out) / "bench-estimation.json", document)
    return document
