"""The e1000 ring's loop in C (native/pci_loop.c): whole datapath turns without Python.

C reaches BAR0 through an fd, as it does through VFIO's device fd. Here a memfd stands in for
BAR0 and the test carries what C wrote there (RDT, TDT) to the e1000 model after each run, and
the model's head registers (RDH, TDH) back before it, as the bus would: the model sees the
register writes a NIC behind VFIO would see. The kernel tier runs the same loop on vfio-pci."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from udrv import fastpath
from udrv.errors import DeviceGone
from udrv.models.pci import ModelPciTransport
from udrv.models.e1000 import E1000Model
from udrv.nic import Nic, NicOptions
from udrv.pcitransport import MmioRegion
from udrv.drivers.e1000 import E1000

from frames import FakeTap, plain

E1000Native = E1000.c_variant()     # the same driver on the C ring

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")

# 8254x register offsets, from the manual (the test's own copy: it checks the driver's)
RDH, RDT, TDH, TDT = 0x2810, 0x2818, 0x3810, 0x3818
BAR_SIZE = 0x20000


class BarFdTransport(ModelPciTransport):
    """The model behind a transport that also offers BAR0 as an fd (a memfd)."""

    def __init__(self, model: E1000Model, mappable: bool):
        super().__init__(model)
        self.bar_fd = os.memfd_create("udrv-test-bar0")
        os.ftruncate(self.bar_fd, BAR_SIZE)
        self.mappable = mappable

    def mmio_region(self) -> MmioRegion:
        return MmioRegion(fd=self.bar_fd, offset=0, size=BAR_SIZE, mappable=self.mappable)

    def bar(self, reg: int) -> int:
        return struct.unpack("<I", os.pread(self.bar_fd, 4, reg))[0]

    def set_bar(self, reg: int, value: int) -> None:
        os.pwrite(self.bar_fd, struct.pack("<I", value), reg)

    def close(self) -> None:
        super().close()
        os.close(self.bar_fd)


class LoopRig:
    def __init__(self, mappable: bool = True):
        self.model = E1000Model("82540em")
        self.transport = BarFdTransport(self.model, mappable)
        self.wire: list[bytes] = []
        self.model.on_transmit = lambda fr: self.wire.append(bytes(fr))
        self.tap = FakeTap(False)
        self.nic = Nic(E1000Native, self.transport, self.tap.write, NicOptions(n_rx=64, n_tx=64))
        self.nic.bring_up()
        self.nic.open()
        self.engine = self.nic.engine

    def turn(self, timeout: float = 0.01, wake_fd: int = -1) -> int:
        """One run() with the registers carried across the 'bus' before and after."""
        t = self.transport
        for head, tail in ((RDH, RDT), (TDH, TDT)):
            t.set_bar(head, self.model.reg(head))
            t.set_bar(tail, self.model.reg(tail))
        moved = self.nic.run(timeout, wake_fd)
        for tail in (RDT, TDT):
            if t.bar(tail) != self.model.reg(tail):
                self.model.mmio_write(tail, t.bar(tail))
        return moved

    def host_frames(self) -> list[bytes]:
        out = []
        self.tap.peer.setblocking(False)
        while True:
            try:
                out.append(self.tap.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.nic.close()
        self.transport.close()
        self.tap.close()


@pytest.fixture(params=[True, False], ids=["mapped", "pread-pwrite"])
def rig(request):
    r = LoopRig(mappable=request.param)
    yield r
    r.close()


def test_the_daemon_runs_the_c_loop_only_where_c_reaches_bar0(rig):
    assert rig.nic.runs_in_c()
    plain_model = Nic(E1000Native, ModelPciTransport(E1000Model("82540em")), FakeTap(False).write,
                      NicOptions(n_rx=64, n_tx=64))
    try:
        plain_model.bring_up()
        plain_model.open()
        assert plain_model.engine.caps.reads_tap and not plain_model.runs_in_c()
    finally:
        plain_model.close()


def test_received_frames_reach_the_tap_and_c_writes_rdt(rig):
    frames = [plain(i, 60 + 23 * i) for i in range(40)]
    for f in frames[:30]:
        assert rig.model.wire_receive(f)
    moved = rig.turn()
    assert moved >= 30
    assert rig.host_frames() == frames[:30]
    assert rig.transport.bar(RDT) == rig.engine.rx_tail == rig.model.reg(RDT)
    # the device got its descriptors back: more frames fit, and go up in order
    for f in frames[30:]:
        assert rig.model.wire_receive(f)
    rig.turn()
    assert rig.host_frames() == frames[30:]
    loop = rig.nic.status()["c_loop"]
    assert loop["rx"] == 40 and loop["turns"] >= 2
    assert loop["sleeps"] >= 1 and loop["idle_checks"] >= 1     # empty turns slept, not spun
    assert rig.nic.status()["rx_packets"] == 40


def test_tap_frames_go_to_the_wire_and_complete(rig):
    frames = [plain(100 + i, 60 + 31 * i) for i in range(20)]
    rig.tap.inject(frames)
    rig.turn()
    j = rig.nic.journal
    j.sync()
    assert j.head - j.tail == 20                       # journaled in C
    assert rig.transport.bar(TDT) == rig.engine.tx_next != 0
    assert rig.wire == frames                          # the TDT write C made, carried to the device
    rig.turn()                                         # completions reclaimed in C
    j.sync()
    assert j.unconfirmed() == 0
    st = rig.nic.status()
    assert st["tx_packets"] == 20 and st["c_loop"]["reclaimed"] >= 20 and st["c_loop"]["tap_in"] == 20


def test_a_readable_wake_fd_ends_the_loop_early(rig):
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        t0 = time.monotonic()
        rig.turn(timeout=30.0, wake_fd=r)
        assert time.monotonic() - t0 < 10.0            # not the 30 s timeout
    finally:
        os.close(r)
        os.close(w)


def test_an_empty_loop_returns_at_its_timeout(rig):
    t0 = time.monotonic()
    assert rig.turn(timeout=0.05) == 0
    assert time.monotonic() - t0 < 10.0
    assert rig.nic.status()["c_loop"]["sleeps"] >= 1


def test_a_removed_device_comes_back_to_python_which_says_so(rig):
    rig.model.surprise_remove()
    rig.transport.set_bar(RDH, 0xFFFFFFFF)            # what a removed device reads as
    with pytest.raises(DeviceGone):
        rig.engine.run(0.05, -1)                       # C sees a head out of range; Python judges
