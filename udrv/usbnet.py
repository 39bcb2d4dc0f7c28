"""USB network drivers the usbnet way: the driver declares, the framework moves frames.

A `UsbNetDriver` names its endpoints and its `Framing`, and implements bring-up and
configuration. `UsbNetEngine` owns the transfers: several bulk-IN and bulk-OUT transfers in
flight, the interrupt endpoint, TX from the journal, RX into the frame sink, bad frames
counted by reason. The engine's `xmit` and `poll` are the driver's datapath entry points.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from . import offload
from .actions import ActionList
from .datapath import DatapathCounters, DatapathDefaults
from .driver import FrameSink, NetDriver
from .errors import DatapathError, DeviceGone, TransportError, UdrvError
from .framing import Framing
from .journal import TxJournal
from .tap import tap_behind
from .usbtransport import (Completion, DeviceInfo, EpType, InterfaceInfo, UsbTransport, XferStatus,
                           cancel_all_and_wait, clear_endpoint_halts)

if TYPE_CHECKING:
    from .usbsimple import StopAndWaitEngine

log = logging.getLogger("udrv.usbnet")

CONTROL_TIMEOUT = 1.0      # seconds a control transfer may take before it counts as a fault


@dataclass(frozen=True)
class UsbId:
    vid: int
    pid: int
    name: str = ""
    flags: int = 0
    device_class: int | None = None   # match only this bDeviceClass (ids shared with other gadgets)

    def matches(self, vid: int, pid: int, device_class: int | None = None) -> bool:
        if (vid, pid) != (self.vid, self.pid):
            return False
        return self.device_class is None or device_class is None or device_class == self.device_class


class UsbNetDriver(NetDriver):
    ids: ClassVar[tuple[UsbId, ...]] = ()
    framing: ClassVar[Framing]
    interface: ClassVar[int] = 0
    EP_IN: ClassVar[int] = 0x81
    EP_OUT: ClassVar[int] = 0x02
    EP_STATUS: ClassVar[int | None] = None
    status_size: ClassVar[int] = 8
    # the C ring: transfers in flight (dummy_hcd and real host controllers move what is queued
    # per (micro)frame: keep many), and whether it coalesces RX into GSO super-frames
    native_rings: ClassVar[tuple[int, int]] = (64, 64)
    coalesce_rx: ClassVar[bool] = False
    # the stop-and-wait variant (udrv/usbsimple.py): the last implementation, one transfer each way
    stop_and_wait: ClassVar[bool] = False

    def __init__(self, usb: UsbTransport, actions: ActionList):
        self.usb = usb
        self.actions = actions
        self.ident: UsbId | None = self.match(usb.info.vid, usb.info.pid, usb.info.device_class)

    @classmethod
    def match(cls, vid: int, pid: int, device_class: int | None = None) -> UsbId | None:
        for i in cls.ids:
            if i.matches(vid, pid, device_class):
                return i
        return None

    @classmethod
    def match_device(cls, info: DeviceInfo) -> bool:
        """A class driver's match (any vid:pid carrying its function); asked after every id
        match failed. Id-matched drivers say False."""
        return False

    @classmethod
    def match_interfaces(cls, classes: list[tuple[int, int]]) -> bool:
        """match_device's cheap form for listings: (class, subclass) of every interface."""
        return False

    def bind(self) -> None:
        """Claim the interface(s); the framework records the release."""
        claim_interface(self.usb, self.interface, self.actions)

    datapath: "UsbNetEngine | StopAndWaitEngine | None" = None

    def on_status(self, data: bytes) -> None:
        """An interrupt-endpoint packet arrived (link changes, error counts)."""

    def start_datapath(self) -> None:
        """Called by open(): the framework submits the RX and interrupt transfers."""
        if self.datapath is not None:
            self.datapath.start()

    def stop_datapath(self) -> None:
        if self.datapath is not None:
            self.datapath.stop()

    @classmethod
    def has_c_datapath(cls) -> bool:
        return not cls.stop_and_wait

    @classmethod
    def implementations(cls) -> tuple[type[NetDriver], ...]:
        """The C ring, the Python engine, then stop-and-wait (datapath code shared with neither)."""
        base = super().implementations()
        if cls.fast_path or cls.stop_and_wait:
            return base
        return (*base, cls.stop_and_wait_variant())

    @classmethod
    def stop_and_wait_variant(cls) -> type["UsbNetDriver"]:
        """The same driver on the stop-and-wait datapath, made once."""
        made = cls.__dict__.get("_stop_and_wait_variant")
        if made is None:
            made = type(f"{cls.__name__}StopAndWait", (cls,), {
                "stop_and_wait": True, "__module__": cls.__module__,
                "__doc__": f"{cls.__name__} on the stop-and-wait datapath (same device code)."})
            cls._stop_and_wait_variant = made
        return made

    @classmethod
    def c_declarations(cls) -> dict[str, Any]:
        # dummy_hcd and real host controllers move what is queued per (micro)frame: keep many in
        # flight. A driver that opts into RX coalescing (coalesce_rx) gets a TAP with a
        # virtio-net header (rx_vnet_hdr) so the ring can write GSO super-frames. TX offloads are
        # the ring's, in software (native/gso.h), whatever the device: the host's stack hands the
        # TAP 64 KiB TCP frames and leaves the checksums, one TAP read for ~44 frames.
        return {"default_rings": cls.native_rings, "rx_vnet_hdr": cls.coalesce_rx,
                "offloads": SOFTWARE_TX_OFFLOADS}

    def framing_now(self) -> Framing:
        """The framing in effect (a driver may pick a variant at probe, e.g. ADM8513)."""
        return self.framing

    def make_datapath(self, journal: TxJournal, sink: FrameSink, n_rx: int, n_tx: int,
                      on_progress: Callable[[], None]) -> Any:
        """The Python engine; on the C variant (fast_path) the C transfer ring (udrv.usbring),
        which reads the TAP and writes received frames to it from C, so it needs the TAP itself
        as the sink. Design diversity in the nDriver sense: the runtime runs the C variant first
        and swaps to the plain driver if it keeps failing."""
        if self.stop_and_wait:
            from .usbsimple import StopAndWaitEngine
            self.datapath = StopAndWaitEngine(self, journal, sink, on_progress)
            return self.datapath
        if self.fast_path:
            from .usbring import make_usb_datapath
            tap = tap_behind(sink)
            if tap is None:
                raise TypeError("the C transfer ring needs the TAP's write method as its sink")
            return make_usb_datapath(self, journal, tap.fileno(), n_rx, n_tx, on_progress, read_tap=True,
                                     tap_vnet_hdr=tap.vnet_hdr_len, rx_coalesce=self.coalesce_rx)
        self.datapath = UsbNetEngine(self, journal, sink, n_rx, n_tx, on_progress)
        return self.datapath


    # --- standard requests (USB 2.0 chapter 9), for drivers that need them -----------------------
    def alt_setting_now(self, interface: int) -> int | None:
        """GET_INTERFACE: the alternate setting as the device reports it (None: it would not say)."""
        try:
            got = self.usb.control_in(REQT_STANDARD_IN_INTERFACE, GET_INTERFACE, 0, interface, 1, CONTROL_TIMEOUT)
        except DeviceGone:
            raise
        except TransportError:               # a STALL, a timeout: it will not say
            return None
        return got[0] if len(got) == 1 else None

    def string_descriptor(self, index: int) -> str:
        """GET_DESCRIPTOR(STRING) in the device's first language (English if it lists none)."""
        langs = self.usb.control_in(REQT_STANDARD_IN, GET_DESCRIPTOR, DT_STRING << 8, 0, 255, CONTROL_TIMEOUT)
        lang = langs[2] | (langs[3] << 8) if len(langs) >= 4 and langs[1] == DT_STRING else LANGID_EN_US
        d = self.usb.control_in(REQT_STANDARD_IN, GET_DESCRIPTOR, (DT_STRING << 8) | index, lang, 255,
                                CONTROL_TIMEOUT)
        if len(d) < 2 or d[1] != DT_STRING:
            raise DeviceRefused(f"USB device {self.usb.info.ident}: string descriptor {index} came back malformed "
                                f"({d[:4].hex() or 'empty'}): its firmware does not answer GET_DESCRIPTOR properly")
        n = min(d[0], len(d))
        return d[2:n - (n % 2)].decode("utf-16-le", "replace")


REQT_STANDARD_IN = 0x80                      # device-to-host, standard, device
REQT_STANDARD_IN_INTERFACE = 0x81            # device-to-host, standard, interface
GET_DESCRIPTOR = 0x06
GET_INTERFACE = 0x0A
DT_STRING = 0x03
LANGID_EN_US = 0x0409
CS_INTERFACE = 0x24                          # class-specific interface descriptor (CDC 1.2 5.2.3)


class DeviceRefused(UdrvError):
    """The device answered a standard request with something malformed (said what, and why)."""


def functional_descriptors(extra: bytes) -> list[tuple[int, bytes]]:
    """Class-specific interface descriptors in an interface's extra bytes -> [(subtype, whole
    descriptor)], as CDC functions (ECM, NCM, ACM) describe themselves. Stops at the first
    malformed length (device data is never trusted to be well formed)."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i + 2 <= len(extra):
        n = extra[i]
        if n < 2 or i + n > len(extra):
            break
        d = extra[i:i + n]
        if d[1] == CS_INTERFACE and n >= 3:
            out.append((d[2], bytes(d)))
        i += n
    return out


def bulk_pair(itf: InterfaceInfo) -> tuple[int, int, int, int] | None:
    """(IN address, OUT address, IN max packet, OUT max packet) of an interface setting's first
    bulk endpoints, or None without both."""
    ins = [e for e in itf.endpoints if e.type is EpType.BULK and e.is_in]
    outs = [e for e in itf.endpoints if e.type is EpType.BULK and not e.is_in]
    if not ins or not outs:
        return None
    return ins[0].address, outs[0].address, ins[0].max_packet or 64, outs[0].max_packet or 64


def claim_interface(usb: UsbTransport, number: int, actions: ActionList) -> None:
    usb.claim_interface(number)
    actions.record(f"claim interface {number}", lambda: usb.release_interface(number))


_RX_TAG = -1
_STATUS_TAG = -2


class UsbNetEngine(DatapathDefaults):
    """The Python datapath of every USB driver (caps: none of the optional things)."""

    def __init__(self, driver: UsbNetDriver, journal: TxJournal, sink: FrameSink,
                 n_rx: int = 4, n_tx: int = 8, on_progress: Callable[[], None] | None = None):
        self.driver = driver
        self.journal = journal
        self.sink = sink
        self.n_rx = n_rx
        self.n_tx = n_tx
        self.counters = DatapathCounters()
        self.on_progress = on_progress
        self.tx_inflight = 0
        self.rx_inflight = 0
        self._tx_lens: deque[tuple[int, bool]] = deque()  # (frame length, last of its entry) per OUT transfer
        self._pieces: deque[tuple[int, bytes]] = deque()   # wire frames of a cut entry not yet submitted
        self._tx_failed = False
        self.running = False
        self._framing = driver.framing_now()
        self._action = None

    @property
    def usb(self) -> UsbTransport:
        # looked up every time: the fault injector may wrap the driver's transport
        return self.driver.usb

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.running:
            return
        self._framing = self.driver.framing_now()
        usb = self.usb
        for _ in range(self.n_rx):
            usb.submit_in(self.driver.EP_IN, self._framing.rx_transfer_size, _RX_TAG)
            self.rx_inflight += 1
        if self.driver.EP_STATUS is not None:
            usb.submit_in(self.driver.EP_STATUS, self.driver.status_size, _STATUS_TAG)
        self.running = True
        self._action = self.driver.actions.record("usbnet transfers", self.stop)

    def stop(self) -> None:
        """Cancel every transfer and wait for the cancellations (no leaked transfers)."""
        if self._action is not None:
            self.driver.actions.released(self._action)
            self._action = None
        self.running = False
        cancel_all_and_wait(self.usb)
        self.tx_inflight = 0
        self.rx_inflight = 0
        self._tx_lens.clear()
        self._pieces.clear()             # an entry cut in part is still unsent: cut again
        self._tx_failed = False

    def reset(self) -> int:
        """Recycle after a fault: drop in-flight transfers, clear halts, re-issue unconfirmed TX."""
        return self.recycle(clear_halts=True)[0]

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        """reset(), the halts cleared or not (a timeout leaves none; each clear is a control
        transfer). Always every transfer: an exception inside this engine's own calls can leave
        its bookkeeping half-updated. Returns (TX entries re-issued, what was recycled)."""
        self.stop()
        if clear_halts:
            clear_endpoint_halts(self.usb, (self.driver.EP_IN, self.driver.EP_OUT))
        again = self.journal.rewind()
        self.start()
        return again, "in-flight transfers recycled"

    # --- datapath entry points ----------------------------------------------------------------
    def xmit(self) -> int:
        """Hand journal frames to the device, keeping up to n_tx OUT transfers in flight."""
        sent = 0
        journal, usb, encode, ep = self.journal, self.usb, self._framing.encode_tx, self.driver.EP_OUT
        while self.tx_inflight < self.n_tx:
            if not self._pieces:
                if journal.aqm_drop():           # waited too long: confirmed with the next
                    journal.mark_sent(journal.sent)
                    continue
                item = journal.peek_unsent()     # after the verdict: a CE mark is in the slot
                if item is None:
                    break
                seq, vnet, frame = item
                pieces = [frame]
                if vnet:
                    # left by the C ring, which finishes offload requests as it sends: the same
                    # work in software, one transfer per wire frame
                    try:
                        pieces = offload.resolve(offload.VnetHdr.parse(vnet), frame)
                    except offload.OffloadError:
                        journal.mark_sent(seq)
                        self.counters.tx_error("bad_offload_request")
                        continue
                self._pieces.extend((seq, p) for p in pieces)
            seq, frame = self._pieces.popleft()
            last = not self._pieces
            if last:                             # the entry is in the device once all of it is
                journal.mark_sent(seq)
            usb.submit_out(ep, encode(frame), seq)
            self._tx_lens.append((len(frame), last))
            self.tx_inflight += 1
            sent += 1
        return sent

    def poll(self, timeout: float = 0.0) -> int:
        """Reap completions: RX frames to the sink, TX confirmations to the journal."""
        done = self.usb.reap(timeout)
        if not done:
            return 0
        error: str | None = None
        for c in done:
            if c.tag >= 0:
                err = self._tx_done(c)
                error = error or err
            elif c.tag == _RX_TAG:
                err = self._rx_done(c)
                error = error or err
            else:
                self._status_done(c)
        if error:
            raise DatapathError(error)
        return len(done)

    def _tx_done(self, c: Completion) -> str | None:
        self.tx_inflight -= 1
        # completions come in order; an entry cut into several wire frames is confirmed by its last
        length, last = self._tx_lens.popleft() if self._tx_lens else (0, True)
        if c.status is XferStatus.OK and self._tx_failed:
            return None     # after a failed frame nothing is confirmed: rewind re-issues it and the rest
        if c.status is XferStatus.OK:
            # an entry's earlier pieces count as they go out; its last one confirms the entry
            wire = self.journal.confirm_through(c.tag) if last else 1
            if wire:
                self.counters.tx_packets += wire
                self.counters.tx_bytes += length
                if self.on_progress:
                    self.on_progress()
            return None
        if c.status is XferStatus.CANCELLED:
            return None
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared during TX")
        self.counters.tx_error(c.status.value)
        self._tx_failed = True
        return f"tx {c.status.value}"

    def _rx_done(self, c: Completion) -> str | None:
        self.rx_inflight -= 1
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared during RX")
        if c.status is XferStatus.CANCELLED or not self.running:
            return None
        error = None
        if c.status is XferStatus.OK:
            frame, reason = self._framing.decode_rx(c.data)
            if frame is None:
                self.counters.drop(reason)
            else:
                self.counters.rx_packets += 1
                self.counters.rx_bytes += len(frame)
                self.sink(frame)
                if self.on_progress:
                    self.on_progress()
        else:
            self.counters.drop(f"rx_{c.status.value}")
            if c.status is XferStatus.STALL:
                self.usb.clear_halt(self.driver.EP_IN)
            elif c.status is not XferStatus.OVERFLOW:
                error = f"rx {c.status.value}"
        self.usb.submit_in(self.driver.EP_IN, self._framing.rx_transfer_size, _RX_TAG)
        self.rx_inflight += 1
        return error

    def _status_done(self, c: Completion) -> None:
        if c.status is XferStatus.NO_DEVICE:
            raise DeviceGone("the USB device disappeared (interrupt endpoint)")
        if not self.running or c.status is XferStatus.CANCELLED:
            return
        if c.status is XferStatus.OK:
            self.counters.status_packets += 1
            self.driver.on_status(c.data)
        elif c.status is XferStatus.STALL and self.driver.EP_STATUS is not None:
            self.usb.clear_halt(self.driver.EP_STATUS)
        assert self.driver.EP_STATUS is not None
        self.usb.submit_in(self.driver.EP_STATUS, self.driver.status_size, _STATUS_TAG)


SOFTWARE_TX_OFFLOADS = frozenset({offload.CSUM, offload.TSO4, offload.TSO6})

