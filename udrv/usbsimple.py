"""Stop-and-wait: the last implementation of every USB driver's datapath.

nDriver's design diversity asks for an alternative that does not share the failing code. The
C transfer ring (udrv/usbring.py) and the Python engine (UsbNetEngine in udrv/usbnet.py) keep
many transfers in flight, cut entries into pieces ahead and batch their completions; this
engine, written apart from both, keeps exactly one OUT and one IN transfer (and the interrupt
endpoint's) in flight and does nothing ahead of the device. It is slower, and it is what the
runtime swaps to when the others keep failing (the driver's device code is the same: only how
frames move differs). An embedded model, whose transport the C ring cannot drive, has this one
and the Python engine.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from . import offload
from .datapath import DatapathCounters, DatapathDefaults
from .errors import DatapathError, DeviceGone
from .journal import TxJournal
from .usbtransport import Completion, XferStatus, cancel_all_and_wait, clear_endpoint_halts

# transfer tags: an OUT transfer carries its journal seq (>= 0)
IN_TAG, STATUS_TAG = -11, -12


class StopAndWaitEngine(DatapathDefaults):
    def __init__(self, driver: Any, journal: TxJournal, sink: Callable[[bytes], None],
                 on_progress: Callable[[], None] | None = None):
        self.driver = driver
        self.journal = journal
        self.sink = sink
        self.on_progress = on_progress
        self.counters = DatapathCounters()
        self.running = False
        self._out: tuple[int, int, bool] | None = None     # (seq, wire length, last piece of its entry)
        self._in = self._status = False                    # those transfers are in flight
        self._pieces: deque[bytes] = deque()               # the rest of an entry cut into wire frames
        self._seq = -1                                      # the entry those pieces belong to
        self._action: Any = None

    @property
    def usb(self) -> Any:
        return self.driver.usb        # looked up each time: the fault injector may wrap it

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._want_in()
        if self.driver.EP_STATUS is not None and not self._status:
            self.usb.submit_in(self.driver.EP_STATUS, self.driver.status_size, STATUS_TAG)
            self._status = True
        self._action = self.driver.actions.record("stop-and-wait transfers", self.stop)

    def stop(self) -> None:
        if self._action is not None:
            self.driver.actions.released(self._action)
            self._action = None
        self.running = False
        cancel_all_and_wait(self.usb)
        self._out, self._in, self._status = None, False, False
        self._pieces.clear()
        self._seq = -1

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        self.stop()
        if clear_halts:
            clear_endpoint_halts(self.usb, (self.driver.EP_IN, self.driver.EP_OUT))
        again = self.journal.rewind()
        self.start()
        return again, "the transfer in flight each way recycled"

    def reset(self) -> int:
        return self.recycle(clear_halts=True)[0]

    # --- frames ----------------------------------------------------------------------------
    def xmit(self) -> int:
        """One wire frame to the device when none is in flight."""
        if self._out is not None or not self.running:
            return 0
        j = self.journal
        if not self._pieces:
            while True:
                if j.aqm_drop():                  # CoDel: waited too long (confirmed with the next)
                    j.mark_sent(j.sent)
                    continue
                item = j.peek_unsent()
                if item is None:
                    return 0
                seq, vnet, frame = item
                try:
                    pieces = offload.resolve(offload.VnetHdr.parse(vnet), frame) if vnet else [frame]
                except offload.OffloadError:
                    j.mark_sent(seq)
                    self.counters.tx_error("bad_offload_request")
                    continue
                self._seq = seq
                self._pieces.extend(bytes(p) for p in pieces)
                break
        frame = self._pieces.popleft()
        last = not self._pieces
        if last:
            j.mark_sent(self._seq)
        self.usb.submit_out(self.driver.EP_OUT, self.driver.framing_now().encode_tx(frame), self._seq)
        self._out = (self._seq, len(frame), last)
        return 1

    def poll(self, timeout: float = 0.0) -> int:
        done = self.usb.reap(timeout)
        failed = ""
        for c in done:
            if c.tag == IN_TAG:
                failed = self._received(c) or failed
            elif c.tag == STATUS_TAG:
                self._status_done(c)
            else:
                failed = self._sent(c) or failed
        if failed:
            raise DatapathError(failed)
        return len(done)

    def _sent(self, c: Completion) -> str:
        out, self._out = self._out, None
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared during TX")
        if c.status is XferStatus.CANCELLED or out is None:
            return ""
        seq, length, last = out
        if c.status is not XferStatus.OK:
            self.counters.tx_error(c.status.value)
            return f"tx {c.status.value}"
        self.counters.tx_packets += 1
        self.counters.tx_bytes += length
        if last:
            self.journal.confirm_through(seq)
        if self.on_progress:
            self.on_progress()
        return ""

    def _received(self, c: Completion) -> str:
        self._in = False
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared during RX")
        if c.status is XferStatus.CANCELLED or not self.running:
            return ""
        failed = ""
        if c.status is XferStatus.OK:
            frame, reason = self.driver.framing_now().decode_rx(c.data)
            if frame is None:
                self.counters.drop(reason)
            else:
                self.counters.rx_packets += 1
                self.counters.rx_bytes += len(frame)
                self.sink(frame)
                if self.on_progress:
                    self.on_progress()
        elif c.status is XferStatus.STALL:
            self.counters.drop("rx_stall")
            self.usb.clear_halt(self.driver.EP_IN)
        elif c.status is XferStatus.OVERFLOW:
            self.counters.drop("rx_overflow")
        else:
            self.counters.drop(f"rx_{c.status.value}")
            failed = f"rx {c.status.value}"
        self._want_in()
        return failed

    def _want_in(self) -> None:
        if self.running and not self._in:
            self.usb.submit_in(self.driver.EP_IN, self.driver.framing_now().rx_transfer_size, IN_TAG)
            self._in = True

    def _status_done(self, c: Completion) -> None:
        self._status = False
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared (interrupt endpoint)")
        if not self.running or c.status is XferStatus.CANCELLED:
            return
        if c.status is XferStatus.OK:
            self.counters.status_packets += 1
            self.driver.on_status(c.data)
        elif c.status is XferStatus.STALL:
            self.usb.clear_halt(self.driver.EP_STATUS)
        self.usb.submit_in(self.driver.EP_STATUS, self.driver.status_size, STATUS_TAG)
        self._status = True
