"""A USB device model whose Ethernet wire runs at a set rate (`udrv run model:X --wire-mbit N`).

The embedded models put every frame on their wire as soon as a bulk OUT transfer brings it, so
the device never holds the driver back and no queue ever builds in front of it. A real NIC's
wire is slower than its host: here a bulk OUT is NAKed (`ModelNoAnswer`, the transfer stays
pending in the transport, as a real device's NAK keeps an URB pending) while the wire is busy
further ahead than a small FIFO covers, and a thread wakes the transport when the wire frees
up. That is the bottleneck a bulk flow meets on real hardware, and where udrv's TX queue and
its AQM show what they do.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from .usb import ModelNoAnswer

# preamble + SFD (8), FCS (4) and the inter-frame gap (12): what a frame costs on the wire
# beyond the bytes the device was given
WIRE_OVERHEAD = 24


class PacedWire:
    """Wraps a USB device model (`udrv.models.usb.UsbDeviceModel`); everything but bulk OUT and
    the notify hook goes to the model unchanged."""

    def __init__(self, model: Any, mbit: float, fifo_frames: int = 2, delay: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        """delay: seconds each frame takes to reach the far end after it left the device (a
        path beyond the LAN, where TCP's window grows past what the wire holds); the device
        answers every transfer at once as before (a STALL, an unplug), only what it puts on its
        wire arrives later: call delay_transmit() once the far end is connected."""
        if mbit <= 0:
            raise ValueError(f"a wire of {mbit} Mbit/s: give a rate above 0")
        if delay < 0:
            raise ValueError(f"a wire delay of {delay} s: give 0 or more")
        self.model = model
        self.delay = delay
        self._line: deque[tuple[float, Callable[[bytes], None], bytes]] = deque()   # (due, far end, frame)
        self.bytes_per_s = mbit * 1e6 / 8
        self.fifo = fifo_frames * (1514 + WIRE_OVERHEAD) / self.bytes_per_s   # seconds of wire queued at most
        self.clock = clock
        self.naks = 0
        self._busy_until = 0.0
        self._notify: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._waiting = False           # a transfer was NAKed: wake the transport when the wire frees
        self._closed = False
        self._thread = threading.Thread(target=self._waker, name="udrv-wire", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def set_notify(self, fn: Callable[[], None]) -> None:
        self._notify = fn
        self.model.set_notify(fn)

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        with self._cond:
            now = self.clock()
            start = max(now, self._busy_until)
            if start - now > self.fifo:
                self.naks += 1
                self._waiting = True
                self._cond.notify()
                raise ModelNoAnswer("the wire is busy")
            self.model.bulk_out(endpoint, data)        # a stall leaves the wire as it was
            self._busy_until = start + (len(data) + WIRE_OVERHEAD) / self.bytes_per_s

    def delay_transmit(self) -> None:
        """Put the delay between the model's wire and whoever it transmits to (its on_transmit,
        set by udrv.peer.PeerWire.connect): frames arrive `delay` after they left, in order."""
        if not self.delay:
            return
        far_end = self.model.on_transmit
        if far_end is None:
            raise ValueError("connect the model's far end (on_transmit) before delaying it")

        def transmit(frame: bytes) -> None:
            with self._cond:
                self._line.append((self.clock() + self.delay, far_end, bytes(frame)))
                self._cond.notify()
        self.model.on_transmit = transmit

    def _waker(self) -> None:
        with self._cond:
            while not self._closed:
                now = self.clock()
                while self._line and self._line[0][0] <= now:
                    _due, far_end, frame = self._line.popleft()
                    far_end(frame)             # the peer's TAP write: no model lock taken
                waits = [self._line[0][0] - now] if self._line else []
                if self._waiting:
                    free_in = self._busy_until - self.fifo - now
                    if free_in <= 0:
                        self._waiting = False
                        if self._notify is not None:
                            self._notify()
                    else:
                        waits.append(free_in)
                self._cond.wait(min(waits) if waits else None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(1.0)
