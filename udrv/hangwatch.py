"""The TX hang watch: frames in the device and no TX completion for `tx_timeout` (Xen's
detector). Only confirmed TX counts as progress: frames received say nothing about the OUT
side. A hang is the device's: it is restored and its OUT side recycled; a second hang with
nothing confirmed since the first recovery restarts the driver.

With the link down a device takes no frames, and that alone is no hang (the kernel's netdev
watchdog does not run without carrier either); but a device that lost its state may have lost
its link with it (an e1000 after a reset behind our back), so it is restored once per
link-down spell, never restarted, and after that the frames wait for the link.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .datapath import Datapath
from .journal import TxJournal


@dataclass
class HangCounts:
    waits_for_carrier: int = 0       # hang looks that found the link down (after its one restore)


class TxHangWatch:
    def __init__(self, journal: TxJournal, tx_timeout: float, *, engine: Callable[[], Datapath],
                 link_down: Callable[[], bool], driver_up: Callable[[], bool],
                 recover: Callable[[str, str], None]):
        self.journal = journal
        self.tx_timeout = tx_timeout
        self._engine = engine            # the datapath now (a restart makes a new one)
        self._link_down = link_down      # asks the device; False also when it cannot tell
        self._driver_up = driver_up
        self._recover = recover          # (what happened, reason to escalate or "")
        self.counts = HangCounts()
        self._last_progress = time.monotonic()
        self._tail_seen = 0              # the journal's confirmed count at the last look
        self._hangs = 0                  # hang recoveries since TX last moved
        self._done_seen = 0.0            # the ring's last OUT completion at the last look (tx_clock)
        self._restored_for_link = False  # a hang with the link down restored the device already

    def started(self, now: float) -> None:
        """Frames went into an idle device: the hang clock starts now."""
        self._last_progress = now

    def moved(self, now: float) -> bool:
        """TX confirmed since the last look: the hang clock starts again at `now`."""
        tail = self.journal.tail
        if tail == self._tail_seen:
            return False
        self._tail_seen, self._last_progress, self._hangs = tail, now, 0
        self._restored_for_link = False
        return True

    def check(self, now: float | None = None) -> bool:
        """False when a hang was found (and recovered from)."""
        now = time.monotonic() if now is None else now
        engine = self._engine()
        if engine.caps.keeps_tx_clock:
            return self._check_clock(now, *engine.tx_clock())
        if self.moved(now) or self.journal.in_device() == 0:
            self._last_progress, self._hangs = now, 0
            return True
        if now - self._last_progress <= self.tx_timeout:
            return True
        self._last_progress = now
        return self._hang(f"{self.journal.in_device()} frames unconfirmed for > {self.tx_timeout}s: "
                          "the device takes no frames")

    def _check_clock(self, now: float, done_at: float, waiting_since: float | None) -> bool:
        """For a ring that keeps the hang clock itself: a hang is OUT transfers that have waited
        longer than tx_timeout with none completing; only a completion since the last hang
        counts as TX moving again."""
        if done_at > self._done_seen:
            self._done_seen, self._hangs, self._restored_for_link = done_at, 0, False
        if waiting_since is None or now - waiting_since <= self.tx_timeout:
            return True
        return self._hang(f"{self.journal.in_device()} frames unconfirmed, OUT transfers waiting "
                          f"{now - waiting_since:.2f}s (> {self.tx_timeout}s): the device takes no frames")

    def _hang(self, what: str) -> bool:
        if self._link_down():
            if self._restored_for_link:
                self.counts.waits_for_carrier += 1
                self._engine().restart_tx_clock()
                self._last_progress = time.monotonic()
                return True
            self._restored_for_link = True
            what += "; the link is down: restored once, then the frames wait for it"
            again = ""
        else:
            if not self._driver_up():     # the link check itself failed and restarted the driver
                return False
            self._restored_for_link = False
            self._hangs += 1
            again = (f"TX still hung after {self._hangs - 1} recovery: nothing confirmed since"
                     if self._hangs > 1 else "")
        self._recover(what, again)
        return False

    def escalated(self) -> None:
        """The recovery escalated to a restart: count hangs afresh."""
        self._hangs = 0
