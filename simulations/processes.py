"""Start real processes for end-to-end tests and end every one of them, by pid.

Flower's SuperLink and SuperNode start helpers of their own (a SuperExec in a
new session, which starts the ServerApp or a ClientApp per message), so a
process group is not enough to find them all. The test process makes itself a
*child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): a helper whose parent
dies is re-parented to the test instead of to init, so walking the process
tree from the test's own pid always finds every descendant, however it was
started, and the test can prove that none is left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _children(*, zombies: bool = False) -> dict[int, list[int]]:
    """Parent pid -> child pids, for every live process (and exited, unreaped ones if asked)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; fields after its ')' are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and not zombies:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, parents before children."""
    tree = _children()
    found, stack = [], list(tree.get(pid, []))
    while stack:
        child = stack.pop(0)
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


class ProcessGroup:
    """The processes one test started, each with its log file, ended together by :meth:`stop_all`."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)
        _set_subreaper(True)

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path | None = None, stdin: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its output in ``LOGS/name.log`` (appended: a restart keeps the history).

        With ``stdin`` the process reads from a pipe the caller writes to (a shell fed commands).
        """
        if name in self.started and self.started[name].poll() is None:
            raise RuntimeError(f"{name} is already running (pid {self.started[name].pid})")
        with open(self.logs / f"{name}.log", "ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=cwd,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the named process and everything below it; return the pids signalled."""
        process = self.started[name]
        pids = [process.pid, *descendants(process.pid)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            process.wait(timeout=10)
        return pids

    def stop_all(self, grace: float = 5.0) -> list[str]:
        """End every process started (SIGTERM, then SIGKILL); return the ones still alive after that (none)."""
        for process in self.started.values():
            for pid in [process.pid, *descendants(process.pid)]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (
            descendants(os.getpid()) or any(p.poll() is None for p in self.started.values())
        ):
            self._reap()
            time.sleep(0.1)
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.started.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.2)
        self._reap()
        left = [f"{pid}: {command_line(pid)}" for pid in descendants(os.getpid())]
        _set_subreaper(False)
        return left

    def _reap(self) -> None:
        """Collect exited orphans the subreaper inherited (Popen reaps its own)."""
        owned = {p.pid for p in self.started.values()}
        for pid in _children(zombies=True).get(os.getpid(), []):
            if pid in owned:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
