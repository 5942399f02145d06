"""How a store encodes the client updates it keeps, and the error feedback that lossy encodings need.

Why: the history is the cost that grows (every client, every round, the whole
model). fp16 halves it; a lossy encoding cuts it by 4 (``int8``) or by about
15 (``topk:0.05``, 5 % of each array's values and their positions). The store
writes its encoding into ``store.json`` (option ``update_dtype``), and every
blob names its own layout in its header, so a reader decodes any store
without being told.

Lossy encodings use error feedback (Seide et al. 2014, "1-bit SGD"; Stich et
al. 2018, "Sparsified SGD with memory"): what the encoding of a client's
update drops is carried into the encoding of that client's next update. The
sum of a client's stored updates over rounds then stays within one round's
encoding error of the sum of its real updates, which is what the
history-based strategies (``subtract``, ``fedrecovery``) add up. Only what is
*stored* is affected: FedAvg averages the real updates, and a retrain never
reads the store.

The carried error (the residual) is one model-sized float32 array set per
client, kept in memory by the store's writer, never on disk:

* it is reset when the store is opened (a resumed run starts with zero
  residuals: the first stored update after a resume lacks at most one round's
  encoding error), and when the history switches trajectory (an unlearning's
  new trajectory must not carry numbers computed on rounds it dropped);
* it is deleted with the client's data key (``destroy_client_key``): it is
  derived from the client's updates, so it is shredded like them;
* it advances only when a round commits, so a round that is re-run after a
  crash or ``discard_uncommitted()`` is encoded from the same residual.

No PyPI library does this for us: PyTorch's DDP communication hooks
(``PowerSGD``, fp16) and GRACE-style packages compress *gradients in flight*
for torch tensors; the store needs numpy updates turned into an
authenticated, self-describing byte layout, so the layouts live in
:mod:`.blob_codec` and only the bookkeeping is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedforget.arrays import Arrays
from fedforget.server.store.blob_codec import LOSSY_METHODS, ModelSpec, encode_arrays, encode_lossy, stored_form

__all__ = ["ErrorFeedback", "UpdateEncoding", "UPDATE_ENCODING_HELP"]

UPDATE_ENCODING_HELP = "float32, float16, int8 or topk:F (keep a fraction F in (0, 1] of each array, e.g. topk:0.05)"


@dataclass(frozen=True)
class UpdateEncoding:
    """One of ``float32``, ``float16``, ``int8``, ``topk:F``: how stored updates are encoded."""

    method: str
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> UpdateEncoding:
        """Parse the store setting; ``ValueError`` naming what is allowed otherwise."""
        name, _, argument = str(text).partition(":")
        if name in ("float32", "float16", "int8") and not argument:
            return cls(name)
        if name == "topk" and argument:
            try:
                fraction = float(argument)
            except ValueError:
                fraction = float("nan")
            if 0 < fraction <= 1:
                return cls("topk", fraction)
        raise ValueError(f"update encoding {text!r} is not known; use {UPDATE_ENCODING_HELP}")

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.method == "topk" else self.method

    @property
    def lossy(self) -> bool:
        """Whether the encoding drops information an error-feedback residual must carry."""
        return self.method in LOSSY_METHODS

    def encode(self, update: Arrays, spec: ModelSpec) -> tuple[bytes, str, Arrays]:
        """``(payload, layout used, the numbers the payload decodes to)`` for one update."""
        if self.lossy:
            return encode_lossy(update, spec, method=self.method, fraction=self.fraction or 1.0)
        payload, used = encode_arrays(update, spec, float_dtype=self.method)
        return payload, used, stored_form(update, spec, float_dtype=used)


class ErrorFeedback:
    """The encoding error each client's stored updates still owe, for one trajectory (see the module docstring)."""

    def __init__(self) -> None:
        self._trajectory: int | None = None
        self._residuals: dict[str, Arrays] = {}

    def corrected(self, trajectory: int, client_id: str, update: Arrays) -> Arrays:
        """The update plus the client's carried residual (float32): what the lossy encoding is applied to."""
        if trajectory != self._trajectory:
            self.reset(trajectory)
        carried = self._residuals.get(client_id)
        out: Arrays = {}
        for name, value in update.items():
            arr = np.asarray(value)
            if arr.dtype.kind != "f":
                out[name] = arr
            elif carried is None:
                out[name] = arr.astype(np.float32, copy=False)
            else:
                out[name] = arr.astype(np.float32, copy=False) + carried[name]
        return out

    @staticmethod
    def left_over(target: Arrays, stored: Arrays) -> Arrays:
        """What the encoding dropped: ``target − stored`` over the floating arrays (0 where either is not finite)."""
        out: Arrays = {}
        for name, value in target.items():
            if np.asarray(value).dtype.kind == "f":
                with np.errstate(invalid="ignore", over="ignore"):
                    diff = np.asarray(value, dtype=np.float32) - stored[name]
                out[name] = np.where(np.isfinite(diff), diff, np.float32(0.0))
        return out

    def commit(self, trajectory: int, residuals: dict[str, Arrays]) -> None:
        """A round committed: these clients now owe these residuals."""
        if trajectory != self._trajectory:
            self.reset(trajectory)
        self._residuals.update(residuals)

    def forget(self, client_id: str) -> None:
        """Drop a client's residual (its data key is being destroyed)."""
        self._residuals.pop(client_id, None)

    def reset(self, trajectory: int | None = None) -> None:
        """Start over with no residuals, for ``trajectory``."""
        self._trajectory = trajectory
        self._residuals = {}

    @property
    def clients(self) -> list[str]:
        """Clients with a carried residual, sorted (for tests and diagnostics)."""
        return sorted(self._residuals)
