"""The worker's life lock (udrv/lifelock.py): the supervisor learns of a death as the process
begins to exit, and only of a death."""
import faulthandler
import os
import select
import signal
import threading
import time

import pytest

from udrv import lifelock
from udrv.heartbeat import LIFE_BASE, SLOT, SLOTS, HeartbeatPage
from udrv.supervisor import _exit_cause

pytestmark = pytest.mark.skipif(not lifelock.available(), reason="this libc has no robust mutexes")


def child_holding(page: HeartbeatPage, slot: int, then=None) -> int:
    """A forked process that takes slot's life lock (as a worker does in Heartbeat.claim), then
    runs `then` or sleeps; the parent returns once the lock is held."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        faulthandler.disable()            # a SIGSEGV here is the test's, not a crash to report
        try:
            page.slot(slot).claim(os.getpid())
            os.write(w, b"k")
            if then is not None:
                then()
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"k"
    os.close(r)
    return pid


@pytest.mark.parametrize("sig,cause", [(signal.SIGKILL, "killed by SIGKILL"), (signal.SIGSEGV, "killed by SIGSEGV")])
def test_a_death_is_told_with_its_cause_before_the_process_is_reaped(sig, cause):
    page = HeartbeatPage()
    lifelock.init(page.life_address(3))
    pid = child_holding(page, 3)
    told = threading.Event()
    seen = []

    def died():
        # the process has begun to exit, nobody has reaped it yet: its exit code is readable
        seen.append(_exit_cause(pid))
        told.set()

    w = lifelock.DeathWatch(page.life_address(3), died)
    time.sleep(0.05)
    assert not told.is_set(), "a living holder was taken for dead"
    os.kill(pid, sig)
    assert told.wait(5), "the death was not told"
    assert w.join(1.0) and not w.waiting
    assert seen == [cause]
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


def test_an_exit_with_a_status_is_a_death_too():
    page = HeartbeatPage()
    lifelock.init(page.life_address(0))
    gate_r, gate_w = os.pipe()
    pid = child_holding(page, 0, then=lambda: (os.read(gate_r, 1), os._exit(70)))
    seen = []
    told = threading.Event()
    lifelock.DeathWatch(page.life_address(0), lambda: (seen.append(_exit_cause(pid)), told.set()))
    os.write(gate_w, b"x")
    assert told.wait(5)
    assert seen == ["exited with status 70"]
    os.waitpid(pid, 0)


def test_a_lock_nobody_holds_is_no_death():
    page = HeartbeatPage()
    lifelock.init(page.life_address(1))
    told = threading.Event()
    w = lifelock.DeathWatch(page.life_address(1), told.set)
    assert w.join(2.0), "the watch did not take a free lock"
    assert not told.is_set()


def test_the_watch_is_told_before_the_pidfd_becomes_readable_or_at_the_latest_with_it():
    """The robust list is released at the start of the holder's exit (before its memory goes):
    the watch is never later than the pidfd. A process with 200 MB to tear down makes the
    difference visible; the test asserts only the order."""
    page = HeartbeatPage()
    lifelock.init(page.life_address(2))
    big = []
    pid = child_holding(page, 2, then=lambda: big.append(bytearray(200 << 20)))
    time.sleep(0.3)
    pidfd = os.pidfd_open(pid)
    told_at = []
    lifelock.DeathWatch(page.life_address(2), lambda: told_at.append(time.monotonic()))
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    select.select([pidfd], [], [], 5)
    readable_at = time.monotonic()
    deadline = time.monotonic() + 2
    while not told_at and time.monotonic() < deadline:
        time.sleep(0.001)
    assert told_at and told_at[0] <= readable_at
    os.close(pidfd)
    os.waitpid(pid, 0)


def test_the_life_locks_lie_in_the_page_after_the_heartbeat_slots():
    page = HeartbeatPage()
    start = page.life_address(0) - LIFE_BASE
    for i in range(SLOTS):
        at = page.life_address(i) - start
        assert at >= SLOTS * SLOT and at % 8 == 0 and at + lifelock.MUTEX_SIZE <= len(page.mem)
