"""The real USB transport: python-libusb1 (asynchronous libusb) for I/O, pyusb for listing.

Several bulk transfers stay in flight per endpoint; completions are collected by libusb
callbacks into a list that `reap()` hands out, so the caller's loop (and later the C ring)
decides what to do with them. The kernel driver is detached while udrv owns the interface
and re-attached when it lets go (recorded on the action list, undone in reverse order).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import usb1

from .actions import ActionList
from .ccallback import c_callback
from .errors import DeviceBusy, DeviceGone, DeviceNotFound, PermissionDeniedError, Stall, TransferTimeout, TransportError
from .usbtransport import (Completion, DeviceInfo, EndpointInfo, EpType, InterfaceInfo, XferStatus,
                           resets_endpoints)

_STATUS = {
    usb1.TRANSFER_COMPLETED: XferStatus.OK,
    usb1.TRANSFER_STALL: XferStatus.STALL,
    usb1.TRANSFER_TIMED_OUT: XferStatus.TIMEOUT,
    usb1.TRANSFER_NO_DEVICE: XferStatus.NO_DEVICE,
    usb1.TRANSFER_CANCELLED: XferStatus.CANCELLED,
    usb1.TRANSFER_OVERFLOW: XferStatus.OVERFLOW,
    usb1.TRANSFER_ERROR: XferStatus.ERROR,
}
_SPEED = {usb1.SPEED_LOW: "low", usb1.SPEED_FULL: "full", usb1.SPEED_HIGH: "high", usb1.SPEED_SUPER: "super"}


def udev_rule(vid: int, pid: int) -> str:
    return (f'SUBSYSTEM=="usb", ATTR{{idVendor}}=="{vid:04x}", ATTR{{idProduct}}=="{pid:04x}", '
            'MODE="0660", GROUP="plugdev"')


@dataclass(frozen=True)
class UsbSelector:
    """How the user named the device: by id (vid:pid) or by location (bus-port.port)."""
    vid: int | None = None
    pid: int | None = None
    bus: int | None = None
    ports: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "UsbSelector":
        t = text.removeprefix("usb:")
        m = re.fullmatch(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})", t)
        if m:
            return cls(vid=int(m[1], 16), pid=int(m[2], 16))
        m = re.fullmatch(r"(\d+)-(\d+(?:\.\d+)*)", t)
        if m:
            return cls(bus=int(m[1]), ports=tuple(int(p) for p in m[2].split(".")))
        raise ValueError(f"{text!r} names no USB device: use usb:VID:PID (e.g. usb:07a6:8515) "
                         "or usb:BUS-PORT[.PORT] (e.g. usb:1-2.3)")

    def matches(self, dev: Any) -> bool:
        if self.vid is not None:
            return (dev.getVendorID(), dev.getProductID()) == (self.vid, self.pid)
        return dev.getBusNumber() == self.bus and tuple(dev.getPortNumberList()) == self.ports

    def __str__(self) -> str:
        if self.vid is not None:
            return f"{self.vid:04x}:{self.pid:04x}"
        return f"{self.bus}-{'.'.join(map(str, self.ports or ()))}"


def _device_info(dev: Any) -> DeviceInfo:
    itfs = []
    for setting in dev.iterSettings():
        eps: list[EndpointInfo] = []
        for ep in setting:
            if any(e.address == ep.getAddress() for e in eps):
                continue          # usbcore keeps the first descriptor of a duplicated address
            eps.append(EndpointInfo(ep.getAddress(), EpType(ep.getAttributes() & 3),
                                    ep.getMaxPacketSize() & 0x7FF, ep.getInterval()))
        itfs.append(InterfaceInfo(setting.getNumber(), setting.getAlternateSetting(), setting.getClass(),
                                  setting.getSubClass(), setting.getProtocol(), tuple(eps),
                                  # python-libusb1 splits the class-specific descriptors into a list
                                  b"".join(bytes(d) for d in setting.getExtra())))
    return DeviceInfo(dev.getVendorID(), dev.getProductID(), dev.getbcdDevice(), dev.getDeviceClass(),
                      dev.getBusNumber(), dev.getDeviceAddress(), tuple(dev.getPortNumberList()),
                      _SPEED.get(dev.getDeviceSpeed(), "unknown"), tuple(itfs))


class LibusbTransport:
    def __init__(self, selector: UsbSelector, actions: ActionList | None = None,
                 context: Any | None = None):
        self.selector = selector
        self.ctx = context or usb1.USBContext()
        self.actions = actions or ActionList()
        self.closed = False
        dev = None
        for d in self.ctx.getDeviceIterator(skip_on_error=True):
            if selector.matches(d):
                dev = d
                break
        if dev is None:
            raise DeviceNotFound(f"no USB device {selector} is plugged in: check `lsusb`, or name it "
                                 "by location with usb:BUS-PORT")
        self.info = _device_info(dev)
        try:
            self.handle = dev.open()
        except usb1.USBErrorAccess:
            raise PermissionDeniedError(
                f"no permission to open USB device {self.info.ident} at {self.info.location}: run as root, "
                f"or add this udev rule to /etc/udev/rules.d/70-udrv.rules and replug: "
                f"{udev_rule(self.info.vid, self.info.pid)}") from None
        except usb1.USBErrorNoDevice:
            raise DeviceGone(f"USB device {self.info.ident} vanished while opening it: replug it") from None
        self.actions.record("open USB device", self.handle.close)
        self._ready()

    @classmethod
    def wrap(cls, fd: int, selector: UsbSelector, context: Any | None = None) -> "LibusbTransport":
        """The device behind an open usbfs file (a worker's, opened for it by the supervisor):
        libusb_wrap_sys_device, so this process needs no right to open device nodes. The fd
        becomes this transport's; it is closed after the handle."""
        self = cls.__new__(cls)
        self.selector = selector
        self.ctx = context or usb1.USBContext()
        self.actions = ActionList()
        self.closed = False
        self.actions.record("close the usbfs file", lambda: os.close(fd))
        try:
            self.handle = self.ctx.wrapSysDevice(fd)
        except usb1.USBErrorNoDevice:
            self.actions.release_all()
            raise DeviceGone(f"USB device {selector} vanished before it could be used: replug it") from None
        except usb1.USBError as e:
            self.actions.release_all()
            raise TransportError(f"libusb cannot use the usbfs file of USB device {selector}: {e}") from None
        device = self.handle.getDevice()
        # closed through its device: python-libusb1 (3.4) asserts when a wrapped handle closes first
        self.actions.record("close the wrapped USB device", device.close)
        self.info = _device_info(device)
        self._ready()
        return self

    def _ready(self) -> None:
        self._eps: dict[int, EndpointInfo] = {}
        for itf in self.info.interfaces:
            for ep in itf.endpoints:
                self._eps.setdefault(ep.address, ep)     # the first descriptor wins, as in usbcore
        self._free: list[Any] = []
        self._inflight: dict[int, Any] = {}     # id(transfer) -> transfer
        self._done: list[Completion] = []
        self.endpoint_resets = 0
        self.device_writes = 0

    # --- errors ------------------------------------------------------------------------------
    def _raise(self, e: Exception, what: str) -> None:
        if isinstance(e, usb1.USBErrorNoDevice):
            raise DeviceGone(f"USB device {self.info.ident} is gone ({what}): it was unplugged or reset; "
                             "plug it back in and udrv picks it up") from None
        if isinstance(e, usb1.USBErrorPipe):
            raise Stall(f"the device STALLed {what}") from None
        if isinstance(e, usb1.USBErrorTimeout):
            raise TransferTimeout(f"the device did not answer {what} in time") from None
        if isinstance(e, usb1.USBErrorBusy):
            raise DeviceBusy(f"USB device {self.info.ident} is busy ({what}): another program holds it; stop it") from None
        if isinstance(e, usb1.USBErrorAccess):
            raise PermissionDeniedError(f"permission denied ({what}): run as root or add the udev rule "
                                        f"{udev_rule(self.info.vid, self.info.pid)}") from None
        raise TransportError(f"{what} failed: {e}") from None

    # --- ownership ------------------------------------------------------------------------------
    def claim_interface(self, number: int) -> None:
        try:
            if self.handle.kernelDriverActive(number):
                self.handle.detachKernelDriver(number)
                self.actions.record(f"detach kernel driver from interface {number}",
                                    lambda: self._reattach(number))
            self.handle.claimInterface(number)
        except usb1.USBError as e:
            self._raise(e, f"claiming interface {number}")

    def _reattach(self, number: int) -> None:
        try:
            self.handle.attachKernelDriver(number)
        except usb1.USBError:
            pass      # no kernel driver for it, or the device is gone: nothing to give back

    def release_interface(self, number: int) -> None:
        try:
            self.handle.releaseInterface(number)
        except usb1.USBError:
            pass

    def set_alt_setting(self, interface: int, alt: int) -> None:
        self.endpoint_resets += 1
        self.device_writes += 1
        try:
            self.handle.setInterfaceAltSetting(interface, alt)
        except usb1.USBError as e:
            self._raise(e, f"selecting alt setting {alt} of interface {interface}")

    def endpoint(self, address: int) -> EndpointInfo:
        return self._eps[address]

    # --- control ---------------------------------------------------------------------------------
    def control_in(self, request_type, request, value, index, length, timeout) -> bytes:
        try:
            return bytes(self.handle.controlRead(request_type, request, value, index, length, int(timeout * 1000)))
        except usb1.USBError as e:
            self._raise(e, f"control request 0x{request:02x}")
            raise

    def control_out(self, request_type, request, value, index, data, timeout) -> None:
        self.device_writes += 1
        if resets_endpoints(request_type, request):
            self.endpoint_resets += 1
        try:
            self.handle.controlWrite(request_type, request, value, index, bytes(data), int(timeout * 1000))
        except usb1.USBError as e:
            self._raise(e, f"control request 0x{request:02x}")

    def clear_halt(self, endpoint: int) -> None:
        self.endpoint_resets += 1      # a data toggle reset, no configured state: not a device write
        try:
            self.handle.clearHalt(endpoint)
        except usb1.USBError as e:
            self._raise(e, f"clearing halt on endpoint 0x{endpoint:02x}")

    # --- async ------------------------------------------------------------------------------------
    def _transfer(self) -> Any:
        return self._free.pop() if self._free else self.handle.getTransfer()

    @c_callback
    def _callback(self, t: Any) -> None:
        self._inflight.pop(id(t), None)
        tag, ep = t.getUserData()
        status = _STATUS.get(t.getStatus(), XferStatus.ERROR)
        n = t.getActualLength()
        data = bytes(t.getBuffer()[:n]) if ep & 0x80 and status is XferStatus.OK else b""
        self._done.append(Completion(tag, ep, status, data, n))
        self._free.append(t)

    def _submit(self, endpoint: int, payload: int | bytes, tag: int, timeout: float) -> None:
        t = self._transfer()
        ep = self._eps.get(endpoint)
        setter = t.setInterrupt if ep is not None and ep.type is EpType.INTERRUPT else t.setBulk
        setter(endpoint, payload, callback=self._callback, user_data=(tag, endpoint), timeout=int(timeout * 1000))
        try:
            t.submit()
        except usb1.USBError as e:
            self._free.append(t)
            self._raise(e, f"submitting a transfer on endpoint 0x{endpoint:02x}")
        self._inflight[id(t)] = t

    def submit_in(self, endpoint, length, tag, timeout=0.0) -> None:
        self._submit(endpoint, length, tag, timeout)

    def submit_out(self, endpoint, data, tag, timeout=0.0) -> None:
        self._submit(endpoint, bytes(data), tag, timeout)

    def reap(self, timeout: float) -> list[Completion]:
        if not self._done:
            try:
                self.ctx.handleEventsTimeout(tv=timeout)
            except usb1.USBErrorInterrupted:
                pass
        done, self._done = self._done, []
        return done

    def cancel_all(self) -> int:
        n = 0
        for t in list(self._inflight.values()):
            try:
                t.cancel()
                n += 1
            except usb1.USBError:
                pass
        return n

    def in_flight(self) -> int:
        return len(self._inflight)

    def poll_fds(self) -> Sequence[tuple[int, int]]:
        return [(fd, ev) for fd, ev in self.ctx.getPollFDList()]

    def close(self) -> None:
        if self.closed:
            return
        self.cancel_all()
        for _ in range(100):
            if not self._inflight:
                break
            try:
                self.ctx.handleEventsTimeout(tv=0.01)
            except usb1.USBError:
                break
        self.actions.release_all()
        self.closed = True


def list_usb_nics(known: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Every USB device with its bound udrv driver (if any), via pyusb enumeration."""
    import usb.core
    out = []
    for d in usb.core.find(find_all=True):
        match = ""
        for name, cls in known:
            if cls.match(d.idVendor, d.idProduct, d.bDeviceClass):
                match = name
            elif cls.match_interfaces(
                    [(i.bInterfaceClass, i.bInterfaceSubClass) for c in d for i in c]):
                match = name
        out.append({"id": f"{d.idVendor:04x}:{d.idProduct:04x}", "bus": d.bus, "address": d.address,
                    "ports": ".".join(map(str, d.port_numbers or ())), "udrv_driver": match})
    return out
