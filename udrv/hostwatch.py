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
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from .threadname import name_this_thread

log = logging.getLogger("udrv")

T = TypeVar("T")


@dataclass
class HostWatch(Generic[T]):
    """`read()` into `latest` every `read_period` s (`reads` counts the successful ones: the loop
    compares `latest` with what it applied whenever the count moved, so a value the host sets
    again after the loop refused and reverted it is not lost), then `on_read(latest)`;
    `tick()` every `tick_period` s.
    A read that raises OSError is skipped (the TAP going away is the loop's business)."""
    read: Callable[[], T]
    tick: Callable[[], object]
    read_period: float = 0.25
    tick_period: float = 1.0
    on_read: Callable[[T], object] | None = None   # after each successful read (the daemon wakes its loop)
    latest: T | None = None
    reads: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _go: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, paused: bool = False) -> "HostWatch[T]":
        """paused: the thread exists but waits for resume() (a warm spare starts its threads
        before it is needed: starting one costs the loop up to milliseconds of the interpreter
        lock, which a takeover cannot spare)."""
        self._stop.clear()
        if not paused:
            self._go.set()
        self._thread = threading.Thread(target=self._main, name="udrv-hostwatch", daemon=True)
        self._thread.start()
        return self

    def resume(self) -> None:
        self._go.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():      # kept: a later stop() can still wait for it
                log.warning("event=hostwatch-stuck waited=%.1fs: a TAP read or placement look has not "
                            "returned", timeout)
                return
            self._thread = None

    def _main(self) -> None:
        name_this_thread("udrv-hostwatch")
        self._go.wait()
        now = time.monotonic()
        next_read, next_tick = now + self.read_period, now + self.tick_period
        while not self._stop.wait(max(0.0, min(next_read, next_tick) - time.monotonic())):
            now = time.monotonic()
            try:
                if now >= next_read:
                    next_read = now + self.read_period
                    try:
                        self.latest = self.read()
                        self.reads += 1          # after latest: the loop reads reads, then latest
                        if self.on_read is not None:
                            self.on_read(self.latest)
                    except OSError:
                        pass
                if now >= next_tick:
                    next_tick = now + self.tick_period
                    self.tick()
            except Exception:            # a bug here must not end the housekeeping silently
                log.exception("event=hostwatch-error")
