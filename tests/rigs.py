"""Rigs shared by the test areas: a driver on its model with the wire side captured."""
from __future__ import annotations

from udrv.drivers.pegasus import Pegasus
from udrv.models.usb import ModelUsbTransport
from udrv.models.pegasus import PegasusModel
from udrv.nic import Nic, NicOptions

PEER_MAC = bytes.fromhex("02aabbccdd01")


def frame_to(dst: bytes, n: int, payload_len: int = 60, src: bytes = PEER_MAC) -> bytes:
    """A frame whose payload carries its own sequence number (so tests can count losses)."""
    body = n.to_bytes(4, "big") + bytes((n + i) & 0xFF for i in range(payload_len - 4))
    return dst + src + b"\x88\xb5" + body


class Rig:
    """A USB driver on its model (default: pegasus on the pegasus model), with the wire side
    captured."""

    def __init__(self, watchdog=None, *, model=None, driver: type = Pegasus, **opts):
        self.model = model if model is not None else PegasusModel()
        self.transport = ModelUsbTransport(self.model)
        self.host_rx: list[bytes] = []        # what the driver delivered to the host (TAP side)
        self.wire_tx: list[bytes] = []        # what the device put on the wire
        self.model.on_transmit = self.wire_tx.append
        self.nic = Nic(driver, self.transport, self.host_rx.append, NicOptions(**opts), watchdog=watchdog)

    def up(self) -> "Rig":
        self.nic.bring_up()
        self.nic.open()
        return self

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            self.nic.xmit()
            self.nic.poll(0.0)
        self.nic.xmit()

    def send(self, frames: list[bytes]) -> None:
        self.nic.enqueue(frames)
        self.pump()
