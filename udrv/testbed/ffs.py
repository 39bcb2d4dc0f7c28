"""Serve any `UsbDeviceModel` as a real USB device through FunctionFS.

The model (udrv.models.usb protocol: control / bulk_out / take_in / set_notify) becomes the
device side of a configfs gadget; the host side of the same kernel then sees an ordinary USB
device, so a kernel driver (pegasus.ko) or a libusb driver (udrv) talks to the model over the
real USB stack: URBs, dummy_hcd, the UDC core, FunctionFS, this process.

How the FunctionFS pieces map onto the model:
- ep0 events: SETUP -> `model.control(setup, data)`. An IN request is answered by writing the
  data to ep0; an OUT request's data stage is read from ep0 (wLength bytes); a ModelStall
  halts ep0 (a read for IN requests, a write for OUT ones: "the wrong direction" is how
  FunctionFS spells STALL). Device-recipient vendor requests only reach ep0 with the
  ALL_CTRL_RECIP descriptor flag (without it pegasus.ko fails probe with -32).
- bulk/interrupt OUT: one read() per host transfer (a transfer ends with a short packet)
  -> `model.bulk_out(addr, data)`.
- bulk/interrupt IN: `model.take_in(addr, n)` -> write(); a bulk transfer that is an exact
  multiple of the max packet size is followed by a zero-length write (a ZLP), or the host
  would merge it with the next transfer. FunctionFS does not add ZLPs by itself.
- endpoint addresses: the UDC, not the descriptors, chooses them. For dummy_hcd the layout
  planner below replays the kernel's endpoint autoconfig over dummy_hcd's endpoint table and
  inserts unused "filler" endpoints so each model endpoint lands on the address its driver
  insists on (pegasus: bulk 0x81, bulk 0x02, interrupt 0x83 needs 8 fillers). The host's
  view is checked after enumeration.

One thread runs a poll loop: ep0 events, AIO completions (udrv.testbed.aio: several requests
queued per bulk endpoint, so the device never falls a transfer behind the host), the model's
notify, and extra readers such as the model's wire TAP. Handing frames between Python threads
costs ~70 us each on a host and ~1 ms under TCG, which is why there is only one thread.
Teardown: unbind the UDC first (every transfer in flight then fails with ESHUTDOWN), then
stop() ends the loop and close() destroys the AIO context and closes the files.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from udrv.models.usb import ModelGone, ModelNoAnswer, ModelStall, Setup, UsbDeviceModel
from udrv.usbtransport import EndpointInfo, EpType, InterfaceInfo

from .aio import AioContext
from .configfs import (ENUMERATE_TIMEOUT, Gadget, GadgetError, GadgetSpec, default_udc, host_endpoints,
                       modprobe, wait_host_device)

log = logging.getLogger("udrv.testbed")

# --- FunctionFS ABI (include/uapi/linux/usb/functionfs.h) -----------------------------------
DESCRIPTORS_MAGIC_V2 = 3
STRINGS_MAGIC = 2
HAS_FS_DESC = 1
HAS_HS_DESC = 2
ALL_CTRL_RECIP = 64
DEFAULT_FLAGS = HAS_FS_DESC | HAS_HS_DESC | ALL_CTRL_RECIP          # = 67

EV_BIND, EV_UNBIND, EV_ENABLE, EV_DISABLE, EV_SETUP, EV_SUSPEND, EV_RESUME = range(7)
EVENT_NAMES = ("bind", "unbind", "enable", "disable", "setup", "suspend", "resume")
EVENT_SIZE = 12              # struct usb_ctrlrequest (8) + u8 type + 3 pad
MAX_EVENTS = 4               # FunctionFS queues at most four


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (ord("g") << 8) | nr


FUNCTIONFS_ENDPOINT_DESC = _ior(130, 9)       # _IOR('g', 130, struct usb_endpoint_descriptor)

USB_DT_INTERFACE = 4
USB_DT_ENDPOINT = 5
LANG_EN_US = 0x0409

# --- timing -----------------------------------------------------------------------------
IDLE_WAIT = 0.25             # the loop re-checks the model this often even without a notify
                             # (a safety net: the model's notify wakes it; TCG makes wakeups dear)
NO_ANSWER_HOLD = 1.2         # a ModelNoAnswer keeps ep0 silent this long (> a host's 1 s timeout)
JOIN_TIMEOUT = 3.0
IO_NICE = -10                # nice value of the server's loop thread (None: leave alone)
HOLD_RETRY = 0.01             # a NAKed OUT transfer is offered to the model again this often
IO_SIZE = 16384              # read size for OUT endpoints: a multiple of every max packet size
BULK_DEPTH = 8               # AIO requests kept queued per bulk endpoint


class DataOffload(Protocol):
    """Moves the data of some bulk endpoints outside the server's loop (e.g. a C pump, see
    udrv.testbed.pegasus_pump). The server keeps ep0 and every other endpoint; it opens the
    offloaded endpoints' files, hands them over, and calls service() from its loop (every
    iteration, and whenever fileno() is readable) so the offload can copy model state, hand
    the model what only the model can judge, and fold its counters into the server's."""
    endpoints: frozenset[int]           # model endpoint addresses the offload serves

    def attach(self, fds: dict[int, int], counters: "FfsCounters", on_gone: Callable[[], None]) -> None: ...
    def fileno(self) -> int: ...
    def set_enabled(self, on: bool, max_packet: dict[int, int]) -> None: ...
    def service(self) -> float | None: ...     # seconds until it wants another call, or None
    def close(self) -> None: ...


class LayoutError(GadgetError):
    """The UDC cannot put the model's endpoints at the addresses the model declares."""


# =========================================================================================
# endpoint layout
# =========================================================================================

@dataclass(frozen=True)
class UdcEndpoint:
    """One endpoint of a UDC's hardware, as usb_ep_autoconfig sees it."""
    name: str
    is_in: bool
    types: frozenset[EpType]
    number: int | None          # fixed by the name ("ep5in-int" -> 5); None = generic, numbered in order


def _udc_ep(name: str, types: str) -> UdcEndpoint:
    kinds = {"bulk": EpType.BULK, "int": EpType.INTERRUPT, "iso": EpType.ISO}
    body = name[2:]
    digits = "".join(c for c in body if c.isdigit()) if body[:1].isdigit() else ""
    is_in = "in" in body.split("-")[0] if digits else name.endswith("in")
    return UdcEndpoint(name, is_in, frozenset(kinds[t] for t in types.split("|")), int(digits) if digits else None)


# dummy_hcd's endpoint table in Linux 6.1 (drivers/usb/gadget/udc/dummy_hcd.c, ep_info[]): the
# pxa250-like fixed endpoints (iso ones compiled out), two sa1100-like ones, then generic
# bulk-or-interrupt ones that usb_ep_autoconfig numbers 1, 2, 3 ... per direction.
DUMMY_HCD_ENDPOINTS: tuple[UdcEndpoint, ...] = tuple(_udc_ep(n, t) for n, t in (
    ("ep1in-bulk", "bulk"), ("ep2out-bulk", "bulk"), ("ep5in-int", "int"), ("ep6in-bulk", "bulk"),
    ("ep7out-bulk", "bulk"), ("ep10in-int", "int"), ("ep11in-bulk", "bulk"), ("ep12out-bulk", "bulk"),
    ("ep15in-int", "int"), ("ep1out-bulk", "bulk"), ("ep2in-bulk", "bulk"),
    ("ep-aout", "bulk|int"), ("ep-bin", "bulk|int"), ("ep-cout", "bulk|int"), ("ep-dout", "bulk|int"),
    ("ep-ein", "bulk|int"), ("ep-fout", "bulk|int"), ("ep-gin", "bulk|int"), ("ep-hout", "bulk|int"),
    ("ep-iout", "bulk|int"), ("ep-jin", "bulk|int"), ("ep-kout", "bulk|int"), ("ep-lin", "bulk|int"),
    ("ep-mout", "bulk|int"),
))


@dataclass(frozen=True)
class Slot:
    """One endpoint descriptor we hand to FunctionFS (a model endpoint or a filler)."""
    address: int                # the host-visible address: wanted (model) or predicted (filler)
    type: EpType
    max_packet_hs: int
    max_packet_fs: int
    interval_ms: int = 0
    filler: bool = False
    udc_index: int = -1         # position in the UDC table the planner predicted (-1: unknown)

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)


class _Autoconfig:
    """A replay of usb_ep_autoconfig's choice over a UDC endpoint table."""

    def __init__(self, table: Sequence[UdcEndpoint]):
        self.table = table
        self.claimed: set[int] = set()
        self.next_num = {True: 0, False: 0}

    def peek(self, is_in: bool, ep_type: EpType) -> tuple[int, int] | None:
        """(table index, address) of the endpoint autoconfig would claim next, or None."""
        for i, ep in enumerate(self.table):
            if i in self.claimed or ep.is_in != is_in:
                continue
            # the kernel lets bulk endpoints carry interrupt transfers
            if ep_type in ep.types or (ep_type is EpType.INTERRUPT and EpType.BULK in ep.types):
                num = ep.number if ep.number is not None else self.next_num[is_in] + 1
                return i, (0x80 if is_in else 0) | num
        return None

    def claim(self, index: int) -> None:
        self.claimed.add(index)
        ep = self.table[index]
        if ep.number is None:
            self.next_num[ep.is_in] += 1


def _hs_and_fs_packet(ep: EndpointInfo) -> tuple[int, int]:
    if ep.type is EpType.BULK:
        return 512, 64                              # the only legal high-speed bulk size
    return ep.max_packet, min(ep.max_packet, 64)


def _filler(auto: _Autoconfig, want: EndpointInfo, candidate: tuple[int, int],
            placed: Sequence[Slot]) -> Slot:
    """An unused endpoint that claims `candidate`. When its address repeats a real endpoint's,
    it copies that endpoint's descriptor: the kernel keeps the first of two descriptors with
    one address, other parsers (libusb users building a dict) the last, and both must agree."""
    index, addr = candidate
    twins = [s for s in placed if not s.filler and s.address == addr]
    kinds: list[tuple[EpType, int, int, int]] = [(t.type, t.max_packet_hs, t.max_packet_fs, t.interval_ms)
                                                 for t in twins]
    kinds.append((want.type, 512 if want.type is EpType.BULK else 8, 64 if want.type is EpType.BULK else 8,
                  want.interval or 1))
    for ep_type, hs, fs, interval in kinds:
        if auto.peek(want.is_in, ep_type) == candidate:
            return Slot(addr, ep_type, hs, fs, interval, filler=True, udc_index=index)
    raise LayoutError(f"no filler endpoint can claim UDC endpoint {auto.table[index].name}")


def plan_endpoints(endpoints: Sequence[EndpointInfo],
                   table: Sequence[UdcEndpoint] | None = DUMMY_HCD_ENDPOINTS) -> list[Slot]:
    """Descriptor order (with fillers) that makes the UDC assign each endpoint its address.

    table=None: no prediction, endpoints in declared order (the UDC picks the addresses).
    """
    slots: list[Slot] = []
    if table is None:
        for ep in endpoints:
            hs, fs = _hs_and_fs_packet(ep)
            slots.append(Slot(ep.address, ep.type, hs, fs, ep.interval))
        return slots
    auto = _Autoconfig(table)
    for ep in endpoints:
        hs, fs = _hs_and_fs_packet(ep)
        while True:
            got = auto.peek(ep.is_in, ep.type)
            if got is None:
                raise LayoutError(
                    f"the UDC has no free {'IN' if ep.is_in else 'OUT'} {ep.type.name.lower()} endpoint that "
                    f"becomes 0x{ep.address:02x}: the model's endpoint list cannot be reproduced on this UDC")
            index, addr = got
            if addr == ep.address:
                auto.claim(index)
                slots.append(Slot(ep.address, ep.type, hs, fs, ep.interval, udc_index=index))
                break
            # claim it with an unused endpoint and try the next one
            slots.append(_filler(auto, ep, got, slots))
            auto.claim(index)
    _check_shadowing(slots)
    if len(slots) > 30:
        raise LayoutError(f"{len(slots)} endpoints needed (with fillers); FunctionFS takes at most 30")
    return slots


def _check_shadowing(slots: Sequence[Slot]) -> None:
    """A filler with the same address as a real endpoint must come later in the UDC table
    (dummy_hcd routes a transfer to the first enabled endpoint with that address)."""
    for real in (s for s in slots if not s.filler):
        for other in slots:
            if other is not real and other.address == real.address and other.udc_index < real.udc_index:
                raise LayoutError(f"endpoint 0x{real.address:02x} would be shadowed by a filler on the UDC: "
                                  "reorder the model's endpoints")


# =========================================================================================
# descriptors
# =========================================================================================

def _hs_interval(ep_type: EpType, ms: int) -> int:
    """Full-speed bInterval is in frames (1 ms); high-speed is 2**(n-1) microframes."""
    if ep_type is not EpType.INTERRUPT:
        return 0
    micro = max(1, ms) * 8
    return min(16, micro.bit_length())


def _interface_desc(itf: InterfaceInfo, n_eps: int, string_index: int) -> bytes:
    return struct.pack("<BBBBBBBBB", 9, USB_DT_INTERFACE, itf.number, itf.alt, n_eps,
                       itf.cls, itf.subclass, itf.protocol, string_index)


def _endpoint_desc(slot: Slot, number: int, high_speed: bool) -> bytes:
    mps = slot.max_packet_hs if high_speed else slot.max_packet_fs
    if slot.type is EpType.INTERRUPT:
        interval = _hs_interval(slot.type, slot.interval_ms) if high_speed else max(1, min(255, slot.interval_ms))
    else:
        interval = 0
    # FunctionFS keys endpoints by this number; the UDC assigns the real address at bind time
    addr = (0x80 if slot.is_in else 0) | number
    return struct.pack("<BBBBHB", 7, USB_DT_ENDPOINT, addr, slot.type.value, mps, interval)


@dataclass
class FunctionPlan:
    """What the function looks like: interfaces and the slots of each (fillers included)."""
    interfaces: list[tuple[InterfaceInfo, list[Slot]]]
    interface_name: str = "udrv model"

    @property
    def slots(self) -> list[Slot]:
        """All slots in descriptor order; FunctionFS names their files ep1, ep2, ..."""
        return [s for _, slots in self.interfaces for s in slots]

    def descriptors(self, flags: int = DEFAULT_FLAGS) -> bytes:
        blobs = {}
        for high in (False, True):
            parts: list[bytes] = []
            n = 0
            for itf, slots in self.interfaces:
                parts.append(_interface_desc(itf, len(slots), 1))
                for s in slots:
                    n += 1
                    parts.append(_endpoint_desc(s, (n - 1) % 15 + 1, high))
            blobs[high] = (len(parts), b"".join(parts))
        body = struct.pack("<II", blobs[False][0], blobs[True][0]) + blobs[False][1] + blobs[True][1]
        return struct.pack("<III", DESCRIPTORS_MAGIC_V2, 12 + len(body), flags) + body

    def strings(self) -> bytes:
        text = self.interface_name.encode() + b"\0"
        body = struct.pack("<IIH", 1, 1, LANG_EN_US) + text
        return struct.pack("<II", STRINGS_MAGIC, 8 + len(body)) + body


def plan_function(info_interfaces: Sequence[InterfaceInfo], name: str = "udrv model",
                  table: Sequence[UdcEndpoint] | None = DUMMY_HCD_ENDPOINTS) -> FunctionPlan:
    itfs = []
    for itf in info_interfaces:
        if itf.alt != 0:
            raise GadgetError(f"interface {itf.number} has alternate setting {itf.alt}: FunctionFS enables every "
                              "endpoint at SET_CONFIGURATION and has no alt settings; serve such a device with a "
                              "kernel function (e.g. udrv.testbed.configfs.ecm_gadget for CDC-ECM)")
        if itf.extra:
            raise GadgetError(f"interface {itf.number} carries class-specific descriptors, which FunctionFS "
                              "refuses; use a kernel function for that class")
        itfs.append((itf, []))
    # the planner replays autoconfig over all endpoints of the function, in order
    all_eps = [ep for itf in info_interfaces for ep in itf.endpoints]
    slots = plan_endpoints(all_eps, table)
    it = iter(slots)
    for (itf, mine) in itfs:
        for ep in itf.endpoints:
            for s in it:
                mine.append(s)
                if not s.filler and s.address == ep.address:
                    break
    return FunctionPlan(itfs, name)


# =========================================================================================
# the server
# =========================================================================================

@dataclass
class FfsCounters:
    events: dict[str, int] = field(default_factory=dict)
    setups: int = 0
    control_stalls: int = 0
    control_no_answer: int = 0
    control_stall_lost: int = 0     # the model stalled an OUT request after its data stage: too late
    control_cancelled: int = 0      # the host gave up on a request (EIDRM)
    out_transfers: int = 0
    out_bytes: int = 0
    out_stalls: int = 0
    out_held: int = 0               # model NAKed (ModelNoAnswer): transfer offered again later
    in_transfers: int = 0
    in_bytes: int = 0
    zlps: int = 0
    in_stalls: int = 0
    in_lost: int = 0                # taken from the model, then the host reset the endpoint
    io_errors: dict[str, int] = field(default_factory=dict)
    gone: int = 0
    setup_ms_total: float = 0.0     # time from reading a SETUP event to answering it (this process)
    setup_ms_max: float = 0.0

    @property
    def setup_ms_mean(self) -> float:
        return self.setup_ms_total / self.setups if self.setups else 0.0

    def event(self, name: str) -> None:
        self.events[name] = self.events.get(name, 0) + 1

    def io_error(self, where: str, err: int) -> None:
        key = f"{where}:{errno.errorcode.get(err, err)}"
        self.io_errors[key] = self.io_errors.get(key, 0) + 1


@dataclass
class _Endpoint:
    slot: Slot
    path: Path
    depth: int                      # requests kept queued at the UDC
    fd: int = -1
    max_packet: int = 0             # at the connected speed, read back after ENABLE
    actual_address: int = 0
    in_flight: int = 0
    next_seq: int = 0               # OUT: sequence of the next read submitted
    deliver_seq: int = 0            # OUT: next completed read to hand to the model, in order
    done: dict[int, bytes | None] = field(default_factory=dict)
    retry_at: float = 0.0           # OUT: the model NAKed; offer again at this time
    halt_pending: bool = False      # IN: halt once the queue is empty (UDCs refuse otherwise)
    offloaded: bool = False         # its data moves through the DataOffload, not the loop

    @property
    def name(self) -> str:
        return f"ep{self.slot.address:02x}"


def _ep_desc(fd: int) -> tuple[int, int] | None:
    """(bEndpointAddress, wMaxPacketSize) the UDC assigned, or None if not enabled yet."""
    buf = bytearray(9)
    try:
        fcntl.ioctl(fd, FUNCTIONFS_ENDPOINT_DESC, buf)
    except OSError:
        return None
    return buf[2], (buf[4] | (buf[5] << 8)) & 0x7FF


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class FfsServer:
    """The device side: FunctionFS files at `mount` driven by `model`, from one poll loop.

    The loop watches ep0 (events), an eventfd for AIO completions, an eventfd the model's
    notify pokes, and any extra readers (add_reader: e.g. the model's wire TAP, so the wire is
    pumped in the same thread). Bulk endpoints keep `depth` AIO requests queued; interrupt
    endpoints one (a status packet should reflect the device when the host reads it).
    """

    def __init__(self, model: UsbDeviceModel, mount: Path, plan: FunctionPlan, *,
                 zlp_types: frozenset[EpType] = frozenset({EpType.BULK}),
                 on_gone: Callable[[], None] | None = None,
                 io_size: int = IO_SIZE, bulk_depth: int = BULK_DEPTH,
                 idle_wait: float = IDLE_WAIT, no_answer_hold: float = NO_ANSWER_HOLD,
                 io_nice: int | None = IO_NICE, offload: DataOffload | None = None):
        self.model = model
        self.offload = offload
        self.mount = Path(mount)
        self.plan = plan
        self.zlp_types = zlp_types
        self.on_gone = on_gone
        self.io_size = io_size
        self.idle_wait = idle_wait
        self.no_answer_hold = no_answer_hold
        self.io_nice = io_nice
        self.counters = FfsCounters()
        self.enabled = threading.Event()
        self._stop = threading.Event()
        self._ep0 = -1
        self._wakefd = -1
        self._aio: AioContext | None = None
        self._thread: threading.Thread | None = None
        self._readers: dict[int, Callable[[], None]] = {}
        self._ep0_hold: tuple[float, Setup] | None = None     # a ModelNoAnswer in progress
        self._eps = [_Endpoint(s, self.mount / f"ep{i + 1}", bulk_depth if s.type is EpType.BULK else 1)
                     for i, s in enumerate(plan.slots)]
        self._real = [e for e in self._eps if not e.slot.filler]
        for e in self._real:
            e.offloaded = offload is not None and e.slot.address in offload.endpoints
        self._offload_wait: float | None = None
        self._gone_reported = False
        self.model.set_notify(self._notify)

    # --- setup -------------------------------------------------------------------------------
    def open(self) -> None:
        """Write descriptors and strings to ep0; FunctionFS then creates the endpoint files."""
        try:
            self._ep0 = os.open(self.mount / "ep0", os.O_RDWR)
        except OSError as e:
            raise GadgetError(f"cannot open {self.mount}/ep0: {e.strerror} (is functionfs mounted there?)") from None
        try:
            os.write(self._ep0, self.plan.descriptors())
        except OSError as e:
            raise GadgetError(f"FunctionFS refused the descriptors ({e.strerror}): check `dmesg` for the "
                              "reason (endpoint count, descriptor sizes)") from None
        try:
            os.write(self._ep0, self.plan.strings())
        except OSError as e:
            raise GadgetError(f"FunctionFS refused the strings ({e.strerror})") from None
        for ep in self._real:
            # O_NONBLOCK: I/O on a not-yet-enabled endpoint fails with EAGAIN instead of
            # sleeping; the transfers themselves are asynchronous anyway.
            ep.fd = os.open(ep.path, os.O_RDWR | os.O_NONBLOCK)
        self._aio = AioContext()
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self.offload is not None:
            self.offload.attach({e.slot.address: e.fd for e in self._real if e.offloaded}, self.counters,
                                self._gone)

    def add_reader(self, fd: int, fn: Callable[[], None]) -> None:
        """Call fn() from the server's loop whenever fd is readable."""
        self._readers[fd] = fn
        self._poke()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="ffs-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Stop the loop; False if it did not finish (a blocking ep0 transfer the host never
        completes: unbind the UDC first, ModelGadget does)."""
        self._stop.set()
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()        # stops its thread and cancels its transfers
        if self._aio is not None:
            self._aio.close()           # cancels and waits for what is still queued
            self._aio = None
        for ep in self._real:
            if ep.fd >= 0:
                os.close(ep.fd)
                ep.fd = -1
        for fd in (self._ep0, self._wakefd):
            if fd >= 0:
                os.close(fd)
        self._ep0 = self._wakefd = -1

    @property
    def endpoint_map(self) -> dict[int, int]:
        """Model address -> address the UDC actually assigned (known once enabled)."""
        return {ep.slot.address: ep.actual_address for ep in self._real}

    # --- the loop ------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wakefd >= 0:
            try:
                os.eventfd_write(self._wakefd, 1)
            except OSError:
                pass

    def _notify(self) -> None:
        self._poke()                    # the model has IN data (maybe from another thread)

    def _main(self) -> None:
        # We are the device: a real one answers in hardware time whatever the host runs, so the
        # loop gets a better nice value than the programs under test (per thread on Linux).
        if self.io_nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.io_nice)
            except OSError:
                pass                    # not root: normal priority
        assert self._aio is not None
        poller = select.poll()
        fixed = {self._aio.efd, self._wakefd}
        offload_fd = self.offload.fileno() if self.offload is not None else -1
        if offload_fd >= 0:
            fixed.add(offload_fd)
        for fd in fixed:
            poller.register(fd, select.POLLIN)
        watching: set[int] = set()
        ep0_on = False
        while not self._stop.is_set():
            want = set(self._readers)
            for fd in want - watching:
                poller.register(fd, select.POLLIN)
            for fd in watching - want:
                poller.unregister(fd)
            watching = want
            if (self._ep0_hold is None) != ep0_on:          # ep0 stays silent during a no-answer
                if ep0_on:
                    poller.unregister(self._ep0)
                else:
                    poller.register(self._ep0, select.POLLIN)
                ep0_on = not ep0_on
            for fd, _ev in poller.poll(self._timeout_ms()):
                if fd == self._ep0:
                    self._ep0_events()
                elif fd == self._aio.efd:
                    self._completions()
                elif fd == self._wakefd:
                    _drain(fd)
                elif fd in self._readers:
                    self._readers[fd]()
            self._deferred()
            self._refill()
            if self.offload is not None:
                # every pass: ep0 may just have changed what the offload has to know
                self._offload_wait = self.offload.service()

    def _timeout_ms(self) -> int:
        t = self.idle_wait
        if self._offload_wait is not None:
            t = min(t, self._offload_wait)
        now = time.monotonic()
        if self._ep0_hold is not None:
            t = min(t, self._ep0_hold[0] - now)
        for ep in self._real:
            if ep.retry_at:
                t = min(t, ep.retry_at - now)
        return max(0, int(t * 1000))

    def _deferred(self) -> None:
        now = time.monotonic()
        if self._ep0_hold is not None and now >= self._ep0_hold[0]:
            _, s = self._ep0_hold
            self._ep0_hold = None
            self._stall_ep0(s)
        for ep in self._real:
            if ep.retry_at and now >= ep.retry_at:
                ep.retry_at = 0.0
                self._deliver_out(ep)

    def _gone(self) -> None:
        self.counters.gone += 1
        if not self._gone_reported and self.on_gone is not None:
            self._gone_reported = True
            try:
                self.on_gone()
            except Exception as e:          # never kill the loop over a callback
                log.warning("on_gone callback failed: %s", e)

    # --- ep0 -------------------------------------------------------------------------------------
    def _ep0_events(self) -> None:
        try:
            raw = os.read(self._ep0, EVENT_SIZE * MAX_EVENTS)
        except OSError as e:
            if e.errno == errno.EIDRM:
                self.counters.control_cancelled += 1
            elif not self._stop.is_set():
                self.counters.io_error("ep0", e.errno)
            return
        for off in range(0, len(raw) - EVENT_SIZE + 1, EVENT_SIZE):
            rt, rq, val, idx, ln, kind = struct.unpack_from("<BBHHHB", raw, off)
            self._event(kind, Setup(rt, rq, val, idx, ln))

    def _event(self, kind: int, setup: Setup) -> None:
        name = EVENT_NAMES[kind] if kind < len(EVENT_NAMES) else f"type{kind}"
        self.counters.event(name)
        if kind == EV_SETUP:
            self._setup(setup)
        elif kind == EV_ENABLE:
            self._learn_endpoints()
            self.enabled.set()
            if self.offload is not None:
                self.offload.set_enabled(True, {e.slot.address: e.max_packet for e in self._real if e.offloaded})
            # The UDC consumed SET_CONFIGURATION; the model still hears about it (it clears halts).
            self._tell_model(Setup(0x00, 0x09, 1, 0, 0))
        elif kind in (EV_DISABLE, EV_UNBIND):
            self.enabled.clear()
            if self.offload is not None:
                self.offload.set_enabled(False, {})

    def _learn_endpoints(self) -> None:
        for ep in self._real:
            got = _ep_desc(ep.fd)
            if got is not None:
                ep.actual_address, ep.max_packet = got
                if ep.actual_address != ep.slot.address:
                    log.warning("model endpoint 0x%02x landed on 0x%02x: the host driver will not find it",
                                ep.slot.address, ep.actual_address)

    def _tell_model(self, setup: Setup) -> None:
        try:
            self.model.control(setup, b"")
        except (ModelStall, ModelNoAnswer):
            pass
        except ModelGone:
            self._gone()

    def _setup(self, s: Setup) -> None:
        t0 = time.monotonic()
        try:
            self._answer(s)
        finally:
            ms = (time.monotonic() - t0) * 1000
            c = self.counters
            c.setups += 1
            c.setup_ms_total += ms
            c.setup_ms_max = max(c.setup_ms_max, ms)

    def _answer(self, s: Setup) -> None:
        fd = self._ep0
        try:
            if s.is_in or not s.length:
                data = self._ask_model(s)
                if data is None:
                    return              # refused: ep0 already stalled or held
                if s.is_in:
                    os.write(fd, bytes(data[:s.length]))
                else:
                    os.read(fd, 0)      # status stage
                return
            # OUT with data: the data stage has to be read before the model can look at it, and
            # FunctionFS completes the status stage with it: a stall after the data cannot reach
            # the host.
            data = os.read(fd, s.length)
            try:
                self.model.control(s, data)
            except (ModelStall, ModelNoAnswer):
                self.counters.control_stall_lost += 1
            except ModelGone:
                self._gone()
        except OSError as e:
            if e.errno == errno.EIDRM:
                self.counters.control_cancelled += 1
            else:
                self.counters.io_error("ep0-setup", e.errno)

    def _ask_model(self, s: Setup) -> bytes | None:
        """A request without an OUT data stage; None when the model refused it (ep0 handled)."""
        try:
            return self.model.control(s, b"")
        except ModelStall:
            self._stall_ep0(s)
        except ModelNoAnswer:
            self._no_answer(s)
        except ModelGone:
            self._gone()
            self._stall_ep0(s)
        return None

    def _stall_ep0(self, s: Setup) -> None:
        self.counters.control_stalls += 1
        try:
            if s.is_in:
                os.read(self._ep0, 1)           # wrong direction = STALL
            else:
                os.write(self._ep0, b"\0")
        except OSError as e:
            if e.errno not in (errno.EL2HLT, errno.EIDRM):
                self.counters.io_error("ep0-stall", e.errno)

    def _no_answer(self, s: Setup) -> None:
        # Touching ep0 would answer (or stall) the request, so leave it alone past the host's
        # timeout; by then the host has sent something new and FunctionFS cancelled this one.
        self.counters.control_no_answer += 1
        self._ep0_hold = (time.monotonic() + self.no_answer_hold, s)

    # --- data endpoints ----------------------------------------------------------------------------
    def _refill(self) -> None:
        if not self.enabled.is_set() or self._aio is None:
            return
        for ep in self._real:
            if ep.offloaded:
                continue
            try:
                if ep.slot.is_in:
                    self._refill_in(ep)
                else:
                    # completed-but-undelivered reads count too: a NAKing model stops the reads
                    while ep.in_flight + len(ep.done) < ep.depth:
                        self._aio.read(ep.fd, self.io_size, (ep, ep.next_seq))
                        ep.next_seq += 1
                        ep.in_flight += 1
            except BlockingIOError:
                pass                            # not enabled (yet / any more)
            except OSError as e:
                self.counters.io_error(f"{ep.name}-submit", e.errno)

    def _refill_in(self, ep: _Endpoint) -> None:
        assert self._aio is not None
        if ep.halt_pending:
            if ep.in_flight == 0:
                ep.halt_pending = False
                self._halt(ep)
            return
        while ep.in_flight < ep.depth:
            try:
                data = self.model.take_in(ep.slot.address, self.io_size if ep.slot.type is EpType.BULK
                                          else max(ep.slot.max_packet_hs, 8))
            except ModelStall:
                self.counters.in_stalls += 1
                ep.halt_pending = True
                return
            except ModelGone:
                self._gone()
                return
            if data is None:
                return
            self._aio.write(ep.fd, data, (ep, None))
            ep.in_flight += 1
            mps = ep.max_packet or ep.slot.max_packet_hs
            if data and len(data) % mps == 0 and ep.slot.type in self.zlp_types:
                # an exact multiple of the packet size: without a ZLP the host would wait for
                # more and merge the next transfer into this one
                self._aio.write(ep.fd, b"", (ep, "zlp"))
                ep.in_flight += 1
                self.counters.zlps += 1

    def _completions(self) -> None:
        assert self._aio is not None
        for c in self._aio.reap():
            ep, seq = c.tag
            ep.in_flight -= 1
            if ep.slot.is_in:
                if c.result < 0:
                    if seq != "zlp":
                        self.counters.in_lost += 1
                    self.counters.io_error(ep.name, -c.result)
                elif seq != "zlp":
                    self.counters.in_transfers += 1
                    self.counters.in_bytes += c.result
                continue
            if c.result < 0:
                self.counters.io_error(ep.name, -c.result)
                ep.done[seq] = None             # keep the sequence moving
            else:
                self.counters.out_transfers += 1
                self.counters.out_bytes += c.result
                ep.done[seq] = c.data or b""
            if not ep.retry_at:
                self._deliver_out(ep)

    def _deliver_out(self, ep: _Endpoint) -> None:
        """Hand completed OUT transfers to the model in the order the host sent them."""
        while ep.deliver_seq in ep.done:
            data = ep.done[ep.deliver_seq]
            if data is not None:
                try:
                    self.model.bulk_out(ep.slot.address, data)
                except ModelNoAnswer:
                    # the device NAKs: keep this transfer (and the ones behind it) for later
                    self.counters.out_held += 1
                    ep.retry_at = time.monotonic() + HOLD_RETRY
                    return
                except ModelStall:
                    self.counters.out_stalls += 1
                    self._halt(ep)
                except ModelGone:
                    self._gone()
            del ep.done[ep.deliver_seq]
            ep.deliver_seq += 1

    def _halt(self, ep: _Endpoint) -> None:
        """STALL the endpoint (I/O in the wrong direction), then tell the model the halt was
        delivered: the host clears it at the UDC with CLEAR_FEATURE, which never reaches us."""
        try:
            if ep.slot.is_in:
                os.read(ep.fd, 1)
            else:
                os.write(ep.fd, b"\0")
        except OSError as e:
            if e.errno != errno.EBADMSG:         # EBADMSG = "halted", the expected answer
                self.counters.io_error(f"{ep.name}-halt", e.errno)
        self._tell_model(Setup(0x02, 0x01, 0, ep.slot.address, 0))


# =========================================================================================
# a model as a complete gadget
# =========================================================================================

FFS_MOUNT_ROOT = Path("/dev/ffs-udrv")


@dataclass
class GadgetConfig:
    name: str = "udrv"
    udc: str | None = None                      # default: the first UDC (loads dummy_hcd if none)
    layout: Sequence[UdcEndpoint] | None = DUMMY_HCD_ENDPOINTS
    mount_root: Path = FFS_MOUNT_ROOT
    enumerate_timeout: float = ENUMERATE_TIMEOUT
    verify_host_view: bool = True
    zlp_types: frozenset[EpType] = frozenset({EpType.BULK})


class ModelGadget:
    """configfs gadget + functionfs mount + FfsServer + UDC bind, for one model.

        with ModelGadget(PegasusModel(), GadgetConfig(name="pegasus")) as g:
            g.host_device      # /sys/bus/usb/devices/<n>-1, enumerated and configured
    """

    def __init__(self, model: UsbDeviceModel, config: GadgetConfig | None = None,
                 offload: DataOffload | None = None):
        self.model = model
        self.offload = offload
        self.cfg = config or GadgetConfig()
        info = model.info
        self.plan = plan_function(info.interfaces, info.product or self.cfg.name, self.cfg.layout)
        self.gadget = Gadget(self.cfg.name, GadgetSpec.from_device_info(info))
        self.mount = self.cfg.mount_root / self.cfg.name
        self.server: FfsServer | None = None
        self.host_device: Path | None = None
        self._mounted = False

    def start(self) -> "ModelGadget":
        udc = self.cfg.udc or default_udc()
        modprobe("usb_f_fs")
        try:
            self.gadget.create()
            self.gadget.add_function("ffs", self.cfg.name)
            self.mount.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "functionfs", self.cfg.name, str(self.mount)], "mounting functionfs")
            self._mounted = True
            self.server = FfsServer(self.model, self.mount, self.plan, zlp_types=self.cfg.zlp_types,
                                    on_gone=lambda: self.gadget.soft_connect(False), offload=self.offload)
            self.server.open()
            self.server.start()
            self.gadget.bind(udc)
            info = self.model.info
            self.host_device = wait_host_device(info.vid, info.pid, self.cfg.enumerate_timeout)
            if self.cfg.verify_host_view:
                self.verify_host_view()
        except BaseException:
            self.stop()
            raise
        return self

    def verify_host_view(self) -> None:
        """Every model endpoint must exist, with its type and direction, where the host looks."""
        assert self.host_device is not None
        seen = host_endpoints(self.host_device)
        for itf in self.model.info.interfaces:
            for ep in itf.endpoints:
                got = seen.get(ep.address)
                want = {EpType.BULK: "Bulk", EpType.INTERRUPT: "Interrupt", EpType.ISO: "Isoc"}[ep.type]
                if got is None or got["type"] != want:
                    found = ", ".join(f"0x{a:02x} {v['type']}" for a, v in sorted(seen.items()))
                    raise LayoutError(f"the host sees no {want} endpoint 0x{ep.address:02x} (it sees: {found}): "
                                      "this kernel's dummy_hcd endpoint table differs from "
                                      "udrv.testbed.ffs.DUMMY_HCD_ENDPOINTS; update it")

    def stop(self) -> None:
        """Unbind (fails transfers in flight), end the loop, close files, unmount, remove."""
        try:
            self.gadget.unbind()
        except GadgetError as e:
            log.warning("%s", e)
        if self.server is not None:
            if not self.server.stop():
                log.warning("the FunctionFS loop is still blocked after unbind")
            self.server.close()
            self.server = None
        if self._mounted:
            _run(["umount", str(self.mount)], "unmounting functionfs", check=False)
            self._mounted = False
            try:
                self.mount.rmdir()
            except OSError:
                pass
        self.gadget.remove()
        self.host_device = None

    @property
    def counters(self) -> FfsCounters | None:
        return self.server.counters if self.server else None

    def __enter__(self) -> "ModelGadget":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(args: list[str], what: str, check: bool = True, timeout: float = 10.0) -> None:
    cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise GadgetError(f"{what} failed: {(cp.stderr or cp.stdout).strip() or 'no output'} "
                          f"(`{' '.join(args)}`; is usb_f_fs loaded?)")
