"""The watchdog interrupts a Python entry point that overran its deadline, and otherwise sleeps:
it wakes for the deadline it watches or for an entry due sooner, not for every entry."""
import time

import pytest

from udrv.errors import EntryTimeout


def test_an_entry_due_sooner_than_the_one_watched_is_caught_at_its_own_deadline(watchdog):
    watchdog.current = ("probe", time.monotonic() + 30.0)
    time.sleep(0.05)                      # the thread now sleeps towards the 30 s deadline
    t0 = time.monotonic()
    with pytest.raises(EntryTimeout, match="link_check overran"):
        try:
            watchdog.current = ("link_check", t0 + 0.1)
            while time.monotonic() - t0 < 5.0:   # a hang in Python code
                pass
        finally:
            watchdog.current = None
    assert time.monotonic() - t0 < 1.0    # a bound (the hang would last 5 s), not a speed claim


def test_entries_that_follow_each_other_do_not_wake_the_watchdog_each_time(watchdog):
    """The daemon's loop enters an entry point dozens of times a second, each due a second out."""
    watchdog.current = None
    time.sleep(0.05)
    looks = watchdog.looks
    end = time.monotonic() + 0.5
    entries = 0
    while time.monotonic() < end:
        watchdog.current = ("xmit", time.monotonic() + 1.0)
        watchdog.current = None
        entries += 1
        time.sleep(0.005)
    assert entries > 20
    # the first entry wakes it (it slept with nothing to watch); the others are due later than
    # the deadline it then sleeps towards (1 s away, after this test's half second)
    assert watchdog.looks - looks <= 2
