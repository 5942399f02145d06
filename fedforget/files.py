"""Crash-safe file writes (a reader sees the old file or the new one, never half of one), and bounded reads."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_and_sync(fd: int, *parts: bytes | memoryview) -> None:
    """Write every byte of ``parts`` to ``fd`` (short writes retried), then fsync it."""
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, document: object) -> None:
    """Write ``document`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(document, indent=2, sort_keys=False) + "\n").encode())


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise PermissionError(f"output directory {path} is not writable: {exc.strerror or exc}") from exc
    return path.resolve()


def read_at_most(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
    """Up to ``limit + 1`` bytes of ``path`` (one more than allowed shows it is too large).

    A file that cannot be read raises ``error`` naming ``what`` it should have
    been, so that a user pointed at the wrong path learns which one.
    """
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} path {path} is a directory") from None
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
