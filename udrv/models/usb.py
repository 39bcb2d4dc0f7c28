"""A UsbTransport backed by an in-process device model.

A model implements `UsbDeviceModel` (the device side of the wire: control requests in,
bulk OUT data in, bulk/interrupt IN data out). This adapter gives it libusb's asynchronous
shape so drivers cannot tell it from `LibusbTransport`. Models exist for fast tests and the
demo; the daemon uses `LibusbTransport` whenever real hardware is named.
"""
from __future__ import annotations

import os
import select
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ..errors import DeviceGone, Stall, TransferTimeout
from ..usbtransport import Completion, DeviceInfo, EndpointInfo, XferStatus, resets_endpoints


@dataclass(frozen=True)
class Setup:
    request_type: int
    request: int
    value: int
    index: int
    length: int

    @property
    def is_in(self) -> bool:
        return bool(self.request_type & 0x80)


class ModelStall(Exception):
    """The model STALLs this request or endpoint."""


class ModelNoAnswer(Exception):
    """The model does not answer (the host sees a timeout)."""


class ModelGone(Exception):
    """The model has been 'unplugged'."""


class UsbDeviceModel(Protocol):
    info: DeviceInfo

    def control(self, setup: Setup, data: bytes) -> bytes: ...
    def bulk_out(self, endpoint: int, data: bytes) -> None: ...
    def take_in(self, endpoint: int, max_len: int) -> bytes | None: ...
    def set_notify(self, fn: Callable[[], None]) -> None: ...


@dataclass
class _Pending:
    tag: int
    endpoint: int
    length: int = 0
    data: bytes = b""


class ModelUsbTransport:
    def __init__(self, model: UsbDeviceModel):
        self.model = model
        self.info = model.info
        self._eps = {ep.address: ep for itf in model.info.interfaces for ep in itf.endpoints}
        self._claimed: set[int] = set()
        self._in: dict[int, deque[_Pending]] = {}
        self._out: deque[_Pending] = deque()
        self._done: deque[Completion] = deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self.endpoint_resets = 0
        self.device_writes = 0
        model.set_notify(self._wake)

    # --- helpers --------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.eventfd_write(self._efd, 1)
        except (BlockingIOError, OSError):
            pass

    def _call(self, fn, *args):
        if self._closed:
            raise DeviceGone("the transport is closed")
        try:
            return fn(*args)
        except ModelGone:
            raise DeviceGone(f"USB device {self.info.ident} is gone: it was unplugged or reset; "
                             "plug it back in and udrv will pick it up again") from None
        except ModelStall:
            raise Stall("the device STALLed the request") from None
        except ModelNoAnswer:
            raise TransferTimeout("the device did not answer in time") from None

    # --- ownership ------------------------------------------------------------------------
    def claim_interface(self, number: int) -> None:
        self._call(lambda: None)
        self._claimed.add(number)

    def release_interface(self, number: int) -> None:
        self._claimed.discard(number)

    def set_alt_setting(self, interface: int, alt: int) -> None:
        self.endpoint_resets += 1
        self.device_writes += 1
        self._call(self.model.control, Setup(0x01, 0x0B, alt, interface, 0), b"")

    def endpoint(self, address: int) -> EndpointInfo:
        return self._eps[address]

    @property
    def claimed(self) -> frozenset[int]:
        return frozenset(self._claimed)

    # --- control ----------------------------------------------------------------------------
    def control_in(self, request_type, request, value, index, length, timeout) -> bytes:
        data = self._call(self.model.control, Setup(request_type | 0x80, request, value, index, length), b"")
        return bytes(data[:length])

    def control_out(self, request_type, request, value, index, data, timeout) -> None:
        self.device_writes += 1
        if resets_endpoints(request_type, request):
            self.endpoint_resets += 1
        self._call(self.model.control, Setup(request_type & 0x7F, request, value, index, len(data)), bytes(data))

    def clear_halt(self, endpoint: int) -> None:
        self.endpoint_resets += 1      # a data toggle reset, no configured state: not a device write
        self._call(self.model.control, Setup(0x02, 0x01, 0, endpoint, 0), b"")

    # --- async -----------------------------------------------------------------------------
    def submit_in(self, endpoint, length, tag, timeout=0.0) -> None:
        self._call(lambda: None)
        self._in.setdefault(endpoint, deque()).append(_Pending(tag, endpoint, length))
        self._wake()

    def submit_out(self, endpoint, data, tag, timeout=0.0) -> None:
        self._call(lambda: None)
        self._out.append(_Pending(tag, endpoint, data=bytes(data)))
        self._wake()

    def _progress(self) -> None:
        while self._out:
            p = self._out.popleft()
            try:
                self.model.bulk_out(p.endpoint, p.data)
                self._done.append(Completion(p.tag, p.endpoint, XferStatus.OK, b"", len(p.data)))
            except ModelStall:
                self._done.append(Completion(p.tag, p.endpoint, XferStatus.STALL))
            except ModelNoAnswer:
                # the device NAKs: like a real bulk OUT without timeout, the transfer stays pending
                self._out.appendleft(p)
                break
            except ModelGone:
                self._fail_all(XferStatus.NO_DEVICE, extra=[p])
                return
        for ep, q in self._in.items():
            while q:
                try:
                    data = self.model.take_in(ep, q[0].length)
                except ModelStall:
                    p = q.popleft()
                    self._done.append(Completion(p.tag, ep, XferStatus.STALL))
                    continue
                except ModelGone:
                    self._fail_all(XferStatus.NO_DEVICE)
                    return
                if data is None:
                    break
                p = q.popleft()
                status = XferStatus.OVERFLOW if len(data) > p.length else XferStatus.OK
                data = bytes(data[:p.length])
                self._done.append(Completion(p.tag, ep, status, data, len(data)))

    def _fail_all(self, status: XferStatus, extra: Sequence[_Pending] = ()) -> None:
        for p in list(extra) + list(self._out):
            self._done.append(Completion(p.tag, p.endpoint, status))
        self._out.clear()
        for q in self._in.values():
            for p in q:
                self._done.append(Completion(p.tag, p.endpoint, status))
            q.clear()

    def reap(self, timeout: float) -> list[Completion]:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self._progress()
        if not self._done and timeout > 0:
            select.select([self._efd], [], [], timeout)
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
            self._progress()
        done = list(self._done)
        self._done.clear()
        return done

    def cancel_all(self) -> int:
        n = 0
        for p in self._out:
            self._done.append(Completion(p.tag, p.endpoint, XferStatus.CANCELLED))
            n += 1
        self._out.clear()
        for q in self._in.values():
            for p in q:
                self._done.append(Completion(p.tag, p.endpoint, XferStatus.CANCELLED))
                n += 1
            q.clear()
        return n

    def in_flight(self) -> int:
        return len(self._out) + sum(len(q) for q in self._in.values())

    def poll_fds(self) -> Sequence[tuple[int, int]]:
        return [(self._efd, select.POLLIN)]

    def close(self) -> None:
        if not self._closed:
            self.cancel_all()
            self._done.clear()
            self._closed = True
            os.close(self._efd)
