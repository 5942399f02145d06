"""The recording thread: in order, low priority, a bounded queue, failures never lost."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from fedforget.server.rounds.background_writer import RECORDING_NICE, BackgroundWriter


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_recording_thread_yields_the_cpu_and_training_keeps_its_priority():
    writer = BackgroundWriter()
    seen: list[int] = []
    writer.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    writer.close()
    assert seen == [RECORDING_NICE]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != RECORDING_NICE


def test_a_full_queue_makes_submit_wait_for_the_oldest_round():
    writer = BackgroundWriter(max_queued=1)
    release = threading.Event()
    order: list[str] = []
    writer.submit(lambda: (release.wait(5), order.append("first")))
    second = threading.Thread(target=writer.submit, args=(lambda: order.append("second"),))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "submit returned while the queue was full"
    release.set()
    second.join(5)
    writer.close()
    assert order == ["first", "second"]


def test_a_failed_write_is_raised_and_later_writes_are_refused():
    writer = BackgroundWriter()
    done: list[str] = []

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: done.append("later"))
    assert done == []
