"""The store's blob files: one encrypted file per model or update, written durably, read without copies.

A blob file is ``blobs/<blob_id>.ffb``: the header and AES-GCM ciphertext of
:mod:`~fedforget.server.store.blob_crypto`. It is written to a temporary name,
fsynced and renamed, so a crash leaves either no file or a whole one; files
the index does not reference (an interrupted round) are *orphans*, deleted
by a writing open and only reported by an audit.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedforget.files import fsync_dir, write_and_sync
from fedforget.server.store.blob_crypto import AuthenticationError, open_blob, seal_blob
from fedforget.server.store.errors import BlobCorruptError, StoreError

__all__ = ["BLOB_SUFFIX", "BlobFiles", "TMP_PREFIX"]

BLOB_SUFFIX = ".ffb"
TMP_PREFIX = ".tmp-"


class BlobFiles:
    """The ``blobs/`` directory of one store."""

    def __init__(self, directory: Path, federation_id: str) -> None:
        self.directory = directory
        self.federation_id = federation_id

    def path(self, blob_id: str) -> Path:
        return self.directory / f"{blob_id}{BLOB_SUFFIX}"

    def write(self, cipher: AESGCM, owner: str, payload: bytes, *, sync_dir: bool = True) -> tuple[str, int]:
        """Encrypt ``payload`` into a new blob file, durably; returns ``(blob_id, size)``.

        The file is complete and fsynced before this returns, and its directory
        entry too unless ``sync_dir`` is false, in which case the caller must
        sync the directory before any index row references the file.
        """
        blob_id = secrets.token_hex(16)
        header, ciphertext = seal_blob(cipher, self.federation_id, blob_id, owner, payload)
        final = self.path(blob_id)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_and_sync(fd, header, ciphertext)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if sync_dir:
                fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob file {final}: {exc.strerror or exc}") from exc
        return blob_id, len(header) + len(ciphertext)

    def read(self, cipher: AESGCM, blob_id: str, owner: str, context: str) -> bytes:
        """Authenticate and decrypt one blob file; :class:`BlobCorruptError` naming it otherwise.

        The file is memory-mapped rather than read, so only the plaintext is
        held in (anonymous) memory.
        """
        path = self.path(blob_id)
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    failure: str | None = "the file is empty"
                    mm = None
                else:
                    failure = None
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as exc:
            raise BlobCorruptError(f"blob file {path} ({context}) is missing; restore it from a backup") from exc
        except OSError as exc:
            raise BlobCorruptError(f"cannot read blob file {path} ({context}): {exc.strerror or exc}") from exc
        plaintext = b""
        if mm is not None:
            try:
                try:
                    plaintext = open_blob(cipher, self.federation_id, blob_id, owner, mm)
                except AuthenticationError as exc:
                    failure = str(exc)
                # the exception (and the buffer views its traceback held) is gone here
            finally:
                mm.close()
        if failure is not None:
            raise BlobCorruptError(
                f"blob file {path} ({context}) failed authentication: {failure}. The file was modified, "
                "truncated or replaced by another file; its contents are not used. Restore it from a backup."
            )
        return plaintext

    def unlink(self, blob_ids: list[str]) -> None:
        for blob_id in blob_ids:
            self.path(blob_id).unlink(missing_ok=True)
        if blob_ids:
            fsync_dir(self.directory)

    def unreferenced(self, known: set[str]) -> list[Path]:
        """Files here that are not blobs of ``known`` ids: orphans of a crash, temporary files, anything else."""
        return sorted(
            Path(entry.path)
            for entry in os.scandir(self.directory)
            if not (entry.name.endswith(BLOB_SUFFIX) and entry.name[: -len(BLOB_SUFFIX)] in known)
        )

    def remove_orphans(self, known: set[str]) -> None:
        """Delete blob and temporary files the index does not reference (writers only: the lock makes it safe)."""
        removed = False
        for path in self.unreferenced(known):
            if path.name.startswith(TMP_PREFIX) or path.name.endswith(BLOB_SUFFIX):
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)
