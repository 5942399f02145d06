"""Write the history store on a background thread, in order, so recording does not slow rounds.

Recording a round (encoding, encrypting and fsyncing every client's update)
takes tens of milliseconds; done inline it lengthens every round by that much.
Queued here, it overlaps with the next round's client training instead. The
price is that the store may lag one round behind the strategy; anything that
reads or changes the store directly must call :meth:`BackgroundWriter.flush`
first. A failed write is re-raised at the next submit or flush: it never goes
unnoticed, and later writes are refused rather than written out of order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWriter:
    """A single worker thread running store writes in submission order."""

    def __init__(self) -> None:
        # Executor threads are joined at interpreter exit, so queued rounds are
        # still committed when a ServerApp returns without flushing.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedforget-recorder")
        self._queued: list[Future[None]] = []
        self._failure: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` after every job submitted before it."""
        self._collect()
        self._queued.append(self._executor.submit(job))

    def flush(self) -> None:
        """Wait until every queued job has run; re-raise the first failure."""
        for future in self._queued:
            future.exception()  # waits
        self._collect()

    def _collect(self) -> None:
        still_queued = []
        for future in self._queued:
            if not future.done():
                still_queued.append(future)
            elif future.exception() is not None and self._failure is None:
                self._failure = future.exception()
        self._queued = still_queued
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Flush, then stop the worker thread."""
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)
