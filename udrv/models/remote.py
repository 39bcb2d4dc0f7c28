"""An embedded device model across a process boundary, as a device is to a driver.

Under the supervisor (udrv/supervisor.py) an embedded model lives in a device process of its
own (udrv/devicehost.py) and must outlive every worker that drives it, as hardware does. Each
worker reaches it over one SOCK_SEQPACKET connection (one message per request) through the
transports here, which implement the same interfaces as `LibusbTransport` and `VfioTransport`:

  RemoteUsbTransport   control requests (synchronous), bulk/interrupt transfers (submitted and
                       completed asynchronously, like URBs); one connection = one open of the
                       device: when it closes, the device process cancels its transfers and
                       drops its claims, as usbfs does when a process's file closes.
  RemotePciTransport   MMIO reads (synchronous) and writes (posted, in order), configuration
                       space, DMA buffers: memfds the device process allocates, maps in its
                       IOMMU and passes over SCM_RIGHTS. Buffers of a connection that closed
                       stay mapped (the supervisor's VFIO container outlives a worker) until the
                       next worker has its own rings programmed and calls `release_orphans()`.

`UsbModelServer` / `PciModelServer` are the device side. The wire format is a fixed header
(op, endpoint, status, tag, a, b) and a payload; nothing is unpickled on either side.
"""
from __future__ import annotations

import array
import enum
import json
import os
import select
import socket
import struct
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Callable, Sequence

from ..dma import DmaMemory
from ..errors import DeviceGone, Stall, TransferTimeout, UdrvError
from ..pcitransport import DmaBuffer, DmaMapping, PciInfo, check_config, check_mmio, update_bus_master
from ..usbtransport import (Completion, DeviceInfo, EndpointInfo, EpType, InterfaceInfo, XferStatus,
                            resets_endpoints)

HEADER = struct.Struct("<BBHqqq")        # op, endpoint, status, tag (a transfer's: any int64), a, b
MAX_MESSAGE = 256 * 1024                 # a 64 KiB frame and its header fit many times over


class Op(enum.IntEnum):
    # USB
    INFO = 1
    CLAIM = 2
    RELEASE = 3
    ALT = 4
    CTRL_IN = 5
    CTRL_OUT = 6
    CLEAR_HALT = 7
    SUBMIT_IN = 8
    SUBMIT_OUT = 9
    CANCEL = 10
    REPLY = 11
    DONE = 12
    # PCI
    PCI_INFO = 20
    READ32 = 21
    WRITE32 = 22
    CFG_READ = 23
    CFG_WRITE = 24
    DMA_ALLOC = 25
    DMA_FREE = 26
    RESET = 27
    ORPHANS = 28


class Status(enum.IntEnum):
    OK = 0
    STALL = 1
    TIMEOUT = 2
    GONE = 3
    ERROR = 4
    VALUE = 5


_XFER = list(XferStatus)


def _pack(op: int, tag: int = 0, a: int = 0, b: int = 0, *, ep: int = 0, status: int = 0,
          payload: bytes = b"") -> bytes:
    return HEADER.pack(op, ep, status, tag, a, b) + payload


def _setup(request_type: int, request: int, value: int, index: int) -> int:
    return request_type | request << 8 | value << 16 | index << 32


def _unsetup(a: int) -> tuple[int, int, int, int]:
    return a & 0xFF, (a >> 8) & 0xFF, (a >> 16) & 0xFFFF, (a >> 32) & 0xFFFF


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def recv_with_fds(sock: socket.socket, maxfds: int = 4) -> tuple[bytes, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, maxfds)
    return data, list(fds)


class _Link:
    """The worker's end: synchronous requests by tag; everything else that arrives meanwhile
    (completions) is kept for the caller."""

    def __init__(self, sock: socket.socket, what: str, on_other: Callable[[tuple, bytes], None],
                 waiting: Callable[[float | None], None] | None = None):
        """waiting(deadline) before a wait for the device, waiting(None) after: how long this
        process will wait (a worker's heartbeat must not call the wait a hang)."""
        self.sock = sock
        self.waiting = waiting or (lambda deadline: None)
        self.what = what
        self.on_other = on_other
        self._tag = 0
        self.closed = False

    def gone(self) -> DeviceGone:
        return DeviceGone(f"the {self.what} device process is gone (its connection closed): the supervisor "
                          "restarts it; if it keeps failing, see the supervisor's log")

    def post(self, msg: bytes, fds: Sequence[int] = ()) -> None:
        if self.closed:
            raise DeviceGone("the transport is closed")
        try:
            send_with_fds(self.sock, msg, fds)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self.gone() from None

    def request(self, op: int, a: int = 0, b: int = 0, *, ep: int = 0, payload: bytes = b"",
                timeout: float = 5.0) -> tuple[int, int, bytes, list[int]]:
        """(status, a, payload, fds) of the reply; raises what the status means."""
        self._tag += 1
        tag = self._tag
        self.post(_pack(op, tag, a, b, ep=ep, payload=payload))
        deadline = time.monotonic() + timeout
        self.waiting(deadline)
        try:
            return self._await(tag, deadline, timeout)
        finally:
            self.waiting(None)

    def _await(self, tag: int, deadline: float, timeout: float) -> tuple[int, int, bytes, list[int]]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"the {self.what} device process did not answer in {timeout:g} s")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                data, fds = recv_with_fds(self.sock)
            except (ConnectionResetError, OSError):
                raise self.gone() from None
            if not data:
                raise self.gone()
            head = HEADER.unpack_from(data)
            if head[0] == Op.REPLY and head[3] == tag:
                status, ra, body = head[2], head[4], data[HEADER.size:]
                _raise_for(status, body)
                return status, ra, body, fds
            for fd in fds:
                os.close(fd)
            self.on_other(head, data[HEADER.size:])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def _raise_for(status: int, body: bytes) -> None:
    if status == Status.OK:
        return
    text = body.decode(errors="replace")
    if status == Status.STALL:
        raise Stall(text or "the device STALLed the request")
    if status == Status.TIMEOUT:
        raise TransferTimeout(text or "the device did not answer in time")
    if status == Status.GONE:
        raise DeviceGone(text or "the device is gone")
    if status == Status.VALUE:
        raise ValueError(text)
    raise UdrvError(text)


def _reply(tag: int, status: int = Status.OK, a: int = 0, payload: bytes = b"") -> bytes:
    return _pack(Op.REPLY, tag, a, status=status, payload=payload)


# --- USB: the worker's side -------------------------------------------------------------------

def info_to_json(info: DeviceInfo) -> bytes:
    d = asdict(info)
    for itf in d["interfaces"]:
        itf["extra"] = itf["extra"].hex()
        for ep in itf["endpoints"]:
            ep["type"] = ep["type"].value
    return json.dumps(d).encode()


def info_from_json(data: bytes) -> DeviceInfo:
    d = json.loads(data)
    itfs = tuple(InterfaceInfo(i["number"], i["alt"], i["cls"], i["subclass"], i["protocol"],
                               tuple(EndpointInfo(e["address"], EpType(e["type"]), e["max_packet"], e["interval"])
                                     for e in i["endpoints"]), bytes.fromhex(i["extra"]))
                 for i in d.pop("interfaces"))
    d["port_path"] = tuple(d["port_path"])
    return DeviceInfo(interfaces=itfs, **d)


class RemoteUsbTransport:
    """A UsbTransport (udrv.usbtransport) over a connection to the device process."""

    def __init__(self, sock: socket.socket, waiting: Callable[[float | None], None] | None = None):
        self._done: deque[Completion] = deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._link = _Link(sock, "USB model", self._other, waiting)
        self._in_flight = 0
        self._claimed: set[int] = set()
        self.endpoint_resets = 0
        self.device_writes = 0
        _s, _a, body, _fds = self._link.request(Op.INFO)
        self.info = info_from_json(body)
        self._eps = {ep.address: ep for itf in self.info.interfaces for ep in itf.endpoints}

    def _other(self, head: tuple, payload: bytes) -> None:
        op, ep, status, tag, length, _b = head
        if op == Op.DONE:
            self._in_flight -= 1
            self._done.append(Completion(tag, ep, _XFER[status], payload, length))
            os.eventfd_write(self._efd, 1)

    # --- ownership -----------------------------------------------------------------------
    def claim_interface(self, number: int) -> None:
        self._link.request(Op.CLAIM, number)
        self._claimed.add(number)

    def release_interface(self, number: int) -> None:
        self._claimed.discard(number)
        try:
            self._link.request(Op.RELEASE, number)
        except DeviceGone:
            pass

    def set_alt_setting(self, interface: int, alt: int) -> None:
        self.endpoint_resets += 1
        self.device_writes += 1
        self._link.request(Op.ALT, interface, alt)

    def endpoint(self, address: int) -> EndpointInfo:
        return self._eps[address]

    @property
    def claimed(self) -> frozenset[int]:
        return frozenset(self._claimed)

    # --- control ---------------------------------------------------------------------------
    def control_in(self, request_type, request, value, index, length, timeout) -> bytes:
        _s, _a, body, _f = self._link.request(Op.CTRL_IN, _setup(request_type, request, value, index), length,
                                              timeout=timeout + 1.0)
        return body[:length]

    def control_out(self, request_type, request, value, index, data, timeout) -> None:
        self.device_writes += 1
        if resets_endpoints(request_type, request):
            self.endpoint_resets += 1
        self._link.request(Op.CTRL_OUT, _setup(request_type, request, value, index), len(data),
                           payload=bytes(data), timeout=timeout + 1.0)

    def clear_halt(self, endpoint: int) -> None:
        self.endpoint_resets += 1
        self._link.request(Op.CLEAR_HALT, ep=endpoint)

    # --- async ------------------------------------------------------------------------------
    def submit_in(self, endpoint, length, tag, timeout=0.0) -> None:
        self._link.post(_pack(Op.SUBMIT_IN, tag, length, ep=endpoint))
        self._in_flight += 1

    def submit_out(self, endpoint, data, tag, timeout=0.0) -> None:
        self._link.post(_pack(Op.SUBMIT_OUT, tag, len(data), ep=endpoint, payload=bytes(data)))
        self._in_flight += 1

    def _drain(self) -> None:
        sock = self._link.sock
        while True:
            try:
                data = sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # the device process went away: as an unplug, for the datapath's recovery
                self._in_flight = 0
                raise self._link.gone()
            self._other(HEADER.unpack_from(data), data[HEADER.size:])

    def reap(self, timeout: float) -> list[Completion]:
        if self._link.closed:
            return []
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self._drain()
        if not self._done and timeout > 0:
            select.select([self._link.sock], [], [], timeout)
            self._drain()
        done = list(self._done)
        self._done.clear()
        return done

    def cancel_all(self) -> int:
        _s, n, _b, _f = self._link.request(Op.CANCEL)
        return n

    def in_flight(self) -> int:
        return max(0, self._in_flight)

    def poll_fds(self) -> Sequence[tuple[int, int]]:
        return [(self._link.sock.fileno(), select.POLLIN), (self._efd, select.POLLIN)]

    def close(self) -> None:
        if not self._link.closed:
            self._link.close()
            os.close(self._efd)


# --- USB: the device's side -------------------------------------------------------------------

class _NotifyFanout:
    """The model's one notify hook, shared by every connection's transport."""

    def __init__(self, model: Any):
        self.model = model
        self.hooks: dict[int, Callable[[], None]] = {}
        model.set_notify(self._notify)

    def _notify(self) -> None:
        for fn in list(self.hooks.values()):
            fn()


class _ModelView:
    """The model as one connection's transport sees it: set_notify registers with the fanout."""

    def __init__(self, fanout: _NotifyFanout, key: int):
        self._fanout, self._key = fanout, key

    def set_notify(self, fn: Callable[[], None]) -> None:
        self._fanout.hooks[self._key] = fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fanout.model, name)


class UsbModelServer:
    """Serves a USB device model to connections; each has a ModelUsbTransport of its own (its
    claims, its transfers), closed with the connection."""

    def __init__(self, model: Any):
        from .usb import ModelUsbTransport
        self._transport_cls = ModelUsbTransport
        self.model = model
        self.fanout = _NotifyFanout(model)
        self.conns: dict[int, tuple[socket.socket, Any]] = {}

    def add(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        t = self._transport_cls(_ModelView(self.fanout, fd))
        self.conns[fd] = (sock, t)

    def fds(self) -> list[int]:
        out = []
        for fd, (_s, t) in self.conns.items():
            out.append(fd)
            out += [f for f, _ev in t.poll_fds()]
        return out

    def drop(self, sock: socket.socket) -> None:
        """Its worker is exiting: cancel its transfers, release its claims, now."""
        if self.conns.get(sock.fileno(), (None,))[0] is sock:
            self._drop(sock.fileno())

    def _drop(self, fd: int) -> None:
        sock, t = self.conns.pop(fd)
        self.fanout.hooks.pop(fd, None)
        for itf in list(t.claimed):
            t.release_interface(itf)
        t.close()
        sock.close()

    def serve(self, readable: set[int]) -> None:
        for fd in list(self.conns):
            sock, t = self.conns[fd]
            if fd in readable:
                if not self._serve_one(sock, t):
                    self._drop(fd)
                    continue
            self._complete(sock, t)

    def _complete(self, sock: socket.socket, t: Any) -> None:
        for c in t.reap(0):
            try:
                sock.send(_pack(Op.DONE, c.tag, c.length, ep=c.endpoint, status=_XFER.index(c.status),
                                payload=c.data))
            except OSError:
                return

    def _serve_one(self, sock: socket.socket, t: Any) -> bool:
        for _ in range(64):
            try:
                data = sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            op, ep, _st, tag, a, b = HEADER.unpack_from(data)
            payload = data[HEADER.size:]
            if op == Op.SUBMIT_IN:
                _call(t.submit_in, ep, a, tag)
                continue
            if op == Op.SUBMIT_OUT:
                _call(t.submit_out, ep, payload, tag)
                continue
            try:
                out = self._sync(t, op, ep, a, b, payload)
                status, ra, body = Status.OK, out[0], out[1]
            except _Refused as e:
                status, ra, body = e.status, 0, str(e).encode()
            try:
                sock.send(_reply(tag, status, ra, body))
            except OSError:
                return False
        return True

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)

    def _sync(self, t: Any, op: int, ep: int, a: int, b: int, payload: bytes) -> tuple[int, bytes]:
        if op == Op.INFO:
            return 0, info_to_json(t.info)
        if op == Op.CLAIM:
            _call(t.claim_interface, a)
            return 0, b""
        if op == Op.RELEASE:
            t.release_interface(a)
            return 0, b""
        if op == Op.ALT:
            _call(t.set_alt_setting, a, b)
            return 0, b""
        if op == Op.CTRL_IN:
            rt, req, value, index = _unsetup(a)
            return 0, _call(t.control_in, rt, req, value, index, b, 1.0)
        if op == Op.CTRL_OUT:
            rt, req, value, index = _unsetup(a)
            _call(t.control_out, rt, req, value, index, payload, 1.0)
            return 0, b""
        if op == Op.CLEAR_HALT:
            _call(t.clear_halt, ep)
            return 0, b""
        if op == Op.CANCEL:
            n = t.cancel_all()
            return n, b""
        raise _Refused(Status.ERROR, f"unknown USB request {op}")


class _Refused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """A transport call on the device side, its errors as reply statuses."""
    try:
        return fn(*args)
    except Stall as e:
        raise _Refused(Status.STALL, str(e)) from None
    except TransferTimeout as e:
        raise _Refused(Status.TIMEOUT, str(e)) from None
    except DeviceGone as e:
        raise _Refused(Status.GONE, str(e)) from None
    except ValueError as e:
        raise _Refused(Status.VALUE, str(e)) from None
    except UdrvError as e:
        raise _Refused(Status.ERROR, str(e)) from None


# --- PCI: the worker's side -------------------------------------------------------------------

class RemotePciTransport:
    """A PciTransport (udrv.pcitransport) over a connection to the device process."""

    device_writes = None             # counts no writes: every datapath fault restores

    def __init__(self, sock: socket.socket, waiting: Callable[[float | None], None] | None = None):
        self._link = _Link(sock, "PCI model", lambda head, payload: None, waiting)
        _s, _a, body, _f = self._link.request(Op.PCI_INFO)
        d = json.loads(body)
        self.bar0_size, self.config_size = d.pop("bar0_size"), d.pop("config_size")
        self.info = PciInfo(**d)
        self._bufs: dict[int, DmaBuffer] = {}
        self._closed = False

    def read32(self, offset: int) -> int:
        check_mmio(offset, self.bar0_size)
        return self._link.request(Op.READ32, offset)[1] & 0xFFFFFFFF

    def write32(self, offset: int, value: int) -> None:
        check_mmio(offset, self.bar0_size)
        self._link.post(_pack(Op.WRITE32, 0, offset, value & 0xFFFFFFFF))

    def config_read(self, offset: int, size: int) -> int:
        check_config(offset, size, self.config_size)
        return self._link.request(Op.CFG_READ, offset, size)[1]

    def config_write(self, offset: int, size: int, value: int) -> None:
        check_config(offset, size, self.config_size)
        self._link.request(Op.CFG_WRITE, offset | size << 32, value & ((1 << (8 * size)) - 1))

    def set_bus_master(self, enabled: bool) -> None:
        update_bus_master(self, enabled)

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        _s, iova, body, fds = self._link.request(Op.DMA_ALLOC, size, align)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UdrvError("the PCI model's process sent no memory for a DMA buffer")
        mapped, huge = struct.unpack("<QB", body)
        mem = DmaMemory.attach(fds[0], mapped, bool(huge))
        buf = DmaBuffer(iova=iova, size=size, view=mem.view(size), vaddr=mem.vaddr, fd=mem.fd, hugepage=bool(huge),
                        mapped_size=mapped, memory=mem)
        self._bufs[iova] = buf
        return buf

    def dma_free(self, buf: DmaBuffer) -> None:
        if self._bufs.get(buf.iova) is not buf:
            from ..errors import DmaError
            raise DmaError(f"DMA buffer at IOVA {buf.iova:#x} is not mapped by this transport (freed twice?): "
                           "free each buffer once")
        del self._bufs[buf.iova]
        try:
            self._link.request(Op.DMA_FREE, buf.iova)
        except DeviceGone:
            pass
        buf.view.release()
        buf.memory.close()

    def dma_mappings(self) -> list[DmaMapping]:
        return [DmaMapping(b.iova, b.mapped_size, b.vaddr) for b in sorted(self._bufs.values(), key=lambda b: b.iova)]

    def release_orphans(self) -> int:
        """Buffers of workers before this one, unmapped now that this one's rings are in the
        device. Returns how many."""
        return self._link.request(Op.ORPHANS)[1]

    def reset(self) -> bool:
        return bool(self._link.request(Op.RESET)[1])

    def poll_fds(self) -> tuple[tuple[int, int], ...]:
        return ()

    def mmio_region(self) -> None:
        return None

    def fds(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.set_bus_master(False)
            for buf in list(self._bufs.values()):
                self.dma_free(buf)
        except (DeviceGone, TransferTimeout):
            pass
        self._link.close()


# --- PCI: the device's side -------------------------------------------------------------------

class PciModelServer:
    """Serves a PCI device model: one ModelPciTransport (the IOMMU and its mappings) for the
    model's life, DMA buffers owned by the connection that allocated them."""

    def __init__(self, model: Any):
        from .pci import ModelPciTransport
        self.model = model
        self.iommu = ModelPciTransport(model)
        self.conns: dict[int, socket.socket] = {}
        self._owner: dict[int, int] = {}          # iova -> fd of the connection (-1: orphaned)
        self._bufs: dict[int, DmaBuffer] = {}

    def add(self, sock: socket.socket) -> None:
        self.conns[sock.fileno()] = sock

    def fds(self) -> list[int]:
        return list(self.conns)

    def serve(self, readable: set[int]) -> None:
        for fd in list(self.conns):
            if fd in readable and not self._serve_one(fd, self.conns[fd]):
                self._drop(fd)

    def drop(self, sock: socket.socket) -> None:
        """Its worker is exiting: what it wrote before it died reaches the device (posted
        writes), then the connection goes and its buffers are orphans."""
        fd = sock.fileno()
        if self.conns.get(fd) is sock:
            while self._serve_one(fd, sock, once=True):
                pass
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        self.conns.pop(fd).close()
        for iova, owner in self._owner.items():
            if owner == fd:
                self._owner[iova] = -1

    def orphans(self) -> int:
        return sum(1 for o in self._owner.values() if o == -1)

    def _serve_one(self, fd: int, sock: socket.socket, once: bool = False) -> bool:
        """Serve up to 64 messages (`once`: one); False when the connection is closed, or, with
        `once`, when nothing is left to read."""
        for _ in range(1 if once else 64):
            try:
                data = sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return not once
            except OSError:
                return False
            if not data:
                return False
            op, _ep, _st, tag, a, b = HEADER.unpack_from(data)
            if op == Op.WRITE32:
                try:
                    self.iommu.write32(a, b)
                except (DeviceGone, ValueError):
                    pass              # a posted write has no answer (a real bus drops it too)
                continue
            fds: list[int] = []
            try:
                ra, body, fds = self._sync(fd, op, a, b)
                msg = _reply(tag, Status.OK, ra, body)
            except _Refused as e:
                msg = _reply(tag, e.status, 0, str(e).encode())
            try:
                send_with_fds(sock, msg, fds)
            except OSError:
                return False
        return True

    def _sync(self, fd: int, op: int, a: int, b: int) -> tuple[int, bytes, list[int]]:
        t = self.iommu
        if op == Op.PCI_INFO:
            i = t.info
            return 0, json.dumps({**asdict(i), "bar0_size": self.model.bar0_size,
                                  "config_size": self.model.config_size}).encode(), []
        if op == Op.READ32:
            return _call(t.read32, a), b"", []
        if op == Op.CFG_READ:
            return _call(t.config_read, a, b), b"", []
        if op == Op.CFG_WRITE:
            _call(t.config_write, a & 0xFFFFFFFF, a >> 32, b)
            return 0, b"", []
        if op == Op.DMA_ALLOC:
            buf = _call(t.dma_alloc, a, b)
            self._bufs[buf.iova] = buf
            self._owner[buf.iova] = fd
            return buf.iova, struct.pack("<QB", buf.mapped_size, int(buf.hugepage)), [buf.fd]
        if op == Op.DMA_FREE:
            buf = self._bufs.pop(a, None)
            if buf is None:
                raise _Refused(Status.VALUE, f"no DMA buffer at IOVA {a:#x}")
            del self._owner[a]
            t.dma_free(buf)
            return 0, b"", []
        if op == Op.ORPHANS:
            gone = [iova for iova, owner in self._owner.items() if owner == -1]
            for iova in gone:
                del self._owner[iova]
                t.dma_free(self._bufs.pop(iova))
            return len(gone), b"", []
        if op == Op.RESET:
            return int(_call(t.reset)), b"", []
        raise _Refused(Status.ERROR, f"unknown PCI request {op}")

    def close(self) -> None:
        for sock in self.conns.values():
            sock.close()
        self.conns.clear()
        self.iommu.close()
