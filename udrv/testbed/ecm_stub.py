"""A stand-in driver for the kernel's own CDC-ECM gadget function (f_ecm): the C USB ring on a
real USB device without udrv's cdc_ecm driver in the way (its tests and bench measure the ring)."""
from __future__ import annotations

from typing import Any

from ..actions import ActionList
from ..framing import Framing, Shape


class EcmStub:
    """The least a UsbNetDriver offers the ring: endpoints, framing, transport, action list."""

    def __init__(self, usb: Any, ep_in: int, ep_out: int, ep_status: int | None):
        self.usb = usb
        self.actions = ActionList()
        self.EP_IN, self.EP_OUT, self.EP_STATUS = ep_in, ep_out, ep_status
        self.status_size = 16
        self.framing = Framing(Shape.RAW, rx_transfer_size=1536 + 4)
        self.status: list[bytes] = []
        self.soft = type("Soft", (), {"mtu": 1500})()

    def framing_now(self) -> Framing:
        return self.framing

    def on_status(self, data: bytes) -> None:
        self.status.append(data)
