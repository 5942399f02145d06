"""Exceptions raised by fedforget's server side.

Why one hierarchy: a caller (the CLI, the server app, a test) can catch
``FedforgetError`` to report any problem we detected ourselves, and let every
other exception surface as the bug it is.  Every message is meant to be read by
a person: it names the file, round or client concerned and, where there is one,
what to do about it.  Nothing here is ever raised to signal a "soft" condition
that the caller is expected to silently ignore.
"""

from __future__ import annotations

__all__ = [
    "FedforgetError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreLockedError",
    "KeyFileError",
    "BlobCorruptError",
    "RowAuthenticationError",
    "KeyDestroyedError",
    "FederationMismatchError",
    "ModelMismatchError",
    "MissingUpdateError",
    "MissingModelError",
    "RoundOrderError",
]


from fedforget.errors import FedforgetError


class StoreError(FedforgetError):
    """The history store cannot do what was asked (I/O, layout, misuse)."""


class StoreExistsError(StoreError):
    """``HistoryStore.create`` was pointed at a path that already holds something."""


class StoreNotFoundError(StoreError):
    """``HistoryStore.open`` was pointed at a path that holds no (complete) store."""


class StoreLockedError(StoreError):
    """The store is already open for writing, by this or another process.

    Opening for writing deletes orphan blob files, which is only safe when
    nobody else is writing; hence one writing handle at a time. Read-only
    handles (audits) take no lock.
    """


class KeyFileError(StoreError):
    """The federation key file is missing, unreadable, malformed or the wrong key."""


class BlobCorruptError(StoreError):
    """A blob file failed authentication or decoding (edited, truncated, swapped, missing).

    Numbers from such a blob are never returned.
    """


class RowAuthenticationError(StoreError):
    """A row of the index does not authenticate under the federation key (edited, replaced or forged).

    Values from such a row are never returned.
    """


class KeyDestroyedError(StoreError):
    """The blob's data key was destroyed (crypto-shredded); it can never be read again."""


class FederationMismatchError(StoreError):
    """The store belongs to a different federation than the caller expects."""


class ModelMismatchError(StoreError):
    """Arrays or a model spec do not match the store's model spec."""


class MissingUpdateError(StoreError):
    """A client's update for a round was not retained, or the client did not take part."""


class MissingModelError(StoreError):
    """A global model version is not in the store (for the trajectory asked about)."""


class RoundOrderError(StoreError, ValueError):
    """Rounds, versions or trajectories were written out of order.

    Also a ``ValueError`` so callers can treat it as the argument error it is.
    """
