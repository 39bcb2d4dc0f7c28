"""A real USB device as the supervisor holds it: found once, opened once per worker, given back.

Each worker gets a usbfs file of its own (`open_for_worker`), opened here as root and passed
over SCM_RIGHTS; the worker wraps it with libusb_wrap_sys_device and claims the interfaces at
promotion. One open per worker matters: when a worker dies its file closes, and the kernel
cancels that file's URBs and releases its claims, so nothing completes into a dead process and
the successor can claim at once. A dup of one shared file would keep both alive.

Workers detach the kernel's driver from the interfaces they claim (as `udrv run --in-process`
does); a worker that is killed cannot give it back, and its successor finds nothing to detach.
So this records, when the device is found, which interfaces had a kernel driver, and `close`
re-attaches every one of them that has none at the end.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import usb1

from .errors import DeviceNotFound, PermissionDeniedError
from .libusb import UsbSelector, udev_rule

log = logging.getLogger("udrv.supervisor")


class UsbNode:
    def __init__(self, selector: UsbSelector):
        self.selector = selector
        self.ctx = usb1.USBContext()
        self.path = ""
        self.ident = ""
        self.kernel_bound: set[int] = set()    # interfaces that had a kernel driver when found
        self.find()

    def find(self) -> str:
        """(Again, after a replug:) the device's node, its kernel-bound interfaces noted."""
        dev = next((d for d in self.ctx.getDeviceIterator(skip_on_error=True) if self.selector.matches(d)), None)
        if dev is None:
            raise DeviceNotFound(f"no USB device {self.selector} is plugged in: check `lsusb`, or name it by "
                                 "location with usb:BUS-PORT")
        self.ident = f"{dev.getVendorID():04x}:{dev.getProductID():04x}"
        self.path = f"/dev/bus/usb/{dev.getBusNumber():03d}/{dev.getDeviceAddress():03d}"
        try:
            handle = dev.open()
        except usb1.USBErrorAccess:
            raise PermissionDeniedError(f"no permission to open USB device {self.ident}: run udrv as root, or add "
                                        f"this udev rule and replug: {udev_rule(dev.getVendorID(), dev.getProductID())}"
                                        ) from None
        try:
            for setting in dev.iterSettings():
                n = setting.getNumber()
                try:
                    if handle.kernelDriverActive(n):
                        self.kernel_bound.add(n)
                except usb1.USBError:
                    pass
        finally:
            handle.close()
        return self.path

    def open_for_worker(self) -> int:
        """A new open of the device's usbfs node, for one worker (the caller closes its copy once
        it is handed over)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self.find()                        # replugged: a new address
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "ident": self.ident, "kernel_bound": sorted(self.kernel_bound)}

    def close(self) -> None:
        """Give the kernel's drivers back the interfaces they had (workers are gone by now)."""
        try:
            dev = next((d for d in self.ctx.getDeviceIterator(skip_on_error=True) if self.selector.matches(d)), None)
            if dev is not None and self.kernel_bound:
                handle = dev.open()
                try:
                    for n in sorted(self.kernel_bound):
                        try:
                            if not handle.kernelDriverActive(n):
                                handle.attachKernelDriver(n)
                                log.info("event=kernel-driver-back device=%s interface=%d", self.ident, n)
                        except usb1.USBError:
                            pass           # no driver wants it, or the device went: nothing to give back
                finally:
                    handle.close()
        except usb1.USBError:
            pass
        finally:
            self.ctx.close()
