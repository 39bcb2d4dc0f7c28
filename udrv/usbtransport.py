"""The USB transport interface.

Two implementations: `udrv.libusb.LibusbTransport` (real devices through libusb) and
`udrv.models.usb.ModelUsbTransport` (an in-process device model for tests and the demo).
Drivers only see this interface, so a driver tested on the model runs unchanged on hardware.

Asynchronous transfers follow libusb's shape: `submit_in`/`submit_out` queue a transfer
tagged with an integer; `reap(timeout)` runs the event loop and returns what completed.
Several transfers per endpoint may be in flight; they complete in submission order.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from .errors import DeviceGone, TransportError


class XferStatus(enum.Enum):
    OK = "ok"
    STALL = "stall"
    TIMEOUT = "timeout"
    NO_DEVICE = "no_device"
    CANCELLED = "cancelled"
    ERROR = "error"
    OVERFLOW = "overflow"


class EpType(enum.Enum):
    CONTROL = 0
    ISO = 1
    BULK = 2
    INTERRUPT = 3


@dataclass(frozen=True)
class EndpointInfo:
    address: int          # bit 7 set = IN
    type: EpType
    max_packet: int
    interval: int = 0

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)


@dataclass(frozen=True)
class InterfaceInfo:
    number: int
    alt: int
    cls: int
    subclass: int
    protocol: int
    endpoints: tuple[EndpointInfo, ...] = ()
    extra: bytes = b""    # class-specific descriptors (CDC functional descriptors live here)


@dataclass(frozen=True)
class DeviceInfo:
    vid: int
    pid: int
    bcd_device: int
    device_class: int
    bus: int
    address: int
    port_path: tuple[int, ...]
    speed: str                          # "low" | "full" | "high" | "super" | "unknown"
    interfaces: tuple[InterfaceInfo, ...] = ()
    manufacturer: str = ""
    product: str = ""
    serial: str = ""

    @property
    def ident(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    @property
    def location(self) -> str:
        return f"{self.bus}-{'.'.join(map(str, self.port_path))}" if self.port_path else f"{self.bus}:{self.address}"


@dataclass
class Completion:
    tag: int
    endpoint: int
    status: XferStatus
    data: bytes = b""       # IN: the bytes received; OUT: empty
    length: int = 0          # bytes actually transferred


def resets_endpoints(request_type: int, request: int) -> bool:
    """A standard request after which the device's endpoint queues and data toggles start over
    (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE(ENDPOINT_HALT)): transfers queued before
    it may have been flushed on either side."""
    if request_type & 0x60:                     # class or vendor: the device's own business
        return False
    return request in (0x09, 0x0B) or (request == 0x01 and request_type & 0x1F == 0x02)


class UsbTransport(Protocol):
    """What a USB driver may do with its device. All timeouts are seconds (float)."""

    info: DeviceInfo
    # bumps on every request that resets endpoint state (set_alt_setting, clear_halt, or one
    # resets_endpoints() names sent through control_out): a datapath compares it with the
    # value when it queued its transfers to know whether they can still be trusted
    endpoint_resets: int
    # bumps on every request that may change the device's configured state (control_out,
    # set_alt_setting; bulk data and clear_halt — a data toggle reset, also sent by the C ring
    # straight through libusb — do not count): unchanged since a checkpoint, the device is still
    # as the checkpoint describes it (Guard.device_as_checkpointed)
    device_writes: int

    # --- ownership --------------------------------------------------------------------
    def claim_interface(self, number: int) -> None: ...
    def release_interface(self, number: int) -> None: ...
    def set_alt_setting(self, interface: int, alt: int) -> None: ...
    def endpoint(self, address: int) -> EndpointInfo: ...

    # --- synchronous control ------------------------------------------------------------
    def control_in(self, request_type: int, request: int, value: int, index: int,
                   length: int, timeout: float) -> bytes: ...
    def control_out(self, request_type: int, request: int, value: int, index: int,
                    data: bytes, timeout: float) -> None: ...
    def clear_halt(self, endpoint: int) -> None: ...

    # --- asynchronous bulk / interrupt ----------------------------------------------------
    def submit_in(self, endpoint: int, length: int, tag: int, timeout: float = 0.0) -> None: ...
    def submit_out(self, endpoint: int, data: bytes, tag: int, timeout: float = 0.0) -> None: ...
    def reap(self, timeout: float) -> list[Completion]: ...
    def cancel_all(self) -> int: ...
    def in_flight(self) -> int: ...

    # --- event integration ------------------------------------------------------------------
    def poll_fds(self) -> Sequence[tuple[int, int]]: ...   # (fd, poll events) to wake the loop

    def close(self) -> None: ...


def cancel_all_and_wait(usb: UsbTransport) -> None:
    """Cancel every transfer and wait (up to ~0.5 s) for the cancellations to come back: no
    transfer outlives the datapath that submitted it (a device that has gone cancels nothing)."""
    try:
        usb.cancel_all()
        for _ in range(50):
            usb.reap(0.0)
            if usb.in_flight() == 0:
                break
            usb.reap(0.01)
    except DeviceGone:
        pass


def clear_endpoint_halts(usb: UsbTransport, endpoints: Sequence[int]) -> None:
    """CLEAR_FEATURE(ENDPOINT_HALT) on each endpoint, as a recycle does (best effort: the device
    may have gone)."""
    for ep in endpoints:
        try:
            usb.clear_halt(ep)
        except TransportError:
            pass


def parse_ident(text: str) -> tuple[int, int]:
    """'07a6:8515' -> (0x07a6, 0x8515); raises ValueError with a usable message."""
    try:
        v, p = text.split(":")
        return int(v, 16), int(p, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a USB id: write it as vid:pid in hex, e.g. 07a6:8515") from None


@dataclass
class TransferCounters:
    """Per-transport counters the status command shows (bad input is counted by reason)."""
    submitted: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
