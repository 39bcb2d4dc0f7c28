"""The daemon's host-side housekeeping, on a thread of its own.

Reading what the host configured on the TAP (flags, MTU, MAC, multicast list) and re-reading
/proc/stat for CPU placement need no device, yet in the daemon's loop they ran between two turns
of the C ring, so the datapath stood still while they did: measured in the QEMU guest (f_ecm,
2 vCPUs, 1 ms probe), 2.3 ms per TAP read every 0.25 s and 3.2 ms per placement look every
second, which made the largest gap between probe replies on an idle link 6-8 ms. Here they run
while the loop sits in C (the C ring holds no interpreter lock); the loop applies a changed
configuration to the driver itself, at its next turn, because that does touch the device.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

log = logging.getLogger("udrv")

T = TypeVar("T")


@dataclass
class HostWatch(Generic[T]):
    """Every `period` s: `read()` into `latest` (with `seq` bumped when it changed) and, every
    `tick_every` periods, `tick()`. A read that raises OSError is skipped (the TAP going away is
    the loop's business)."""
    read: Callable[[], T]
    tick: Callable[[], object]
    period: float = 0.25
    tick_every: int = 4
    latest: T | None = None
    seq: int = 0                  # bumped on every change: the loop compares it with the one it applied
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "HostWatch[T]":
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="udrv-hostwatch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _look(self) -> None:
        try:
            cur = self.read()
        except OSError:
            return
        if cur != self.latest:
            self.latest = cur
            self.seq += 1

    def _main(self) -> None:
        n = 0
        while not self._stop.wait(self.period):
            try:
                self._look()
                n += 1
                if n % self.tick_every == 0:
                    self.tick()
            except Exception:            # a bug here must not end the housekeeping silently
                log.exception("event=hostwatch-error")
