"""The PCI ring engine (udrv.pcinet, udrv.pciring) takes what a driver declares: its ring
registers, its codec, its C variant.

The remapped driver is the e1000 driver with its one RX and TX queue's registers where igb
keeps queue 0's (RDBAL0 0xC000 .. RDT0 0xC018, TDBAL0 0xE000 .. TDT0 0xE018). A transport in
front of the e1000 model moves those offsets to where the model has them and refuses the
e1000 ring offsets outright: the engine (Python or C, per batch or in the C loop) works only
if every ring register it touches is the one the driver declared."""
from __future__ import annotations

import os
import struct

import pytest

from udrv import fastpath
from udrv.datapath import Capabilities, Datapath, DatapathReport, TapCounts
from udrv.drivers.e1000 import E1000, E1000Codec
from udrv.models.e1000 import E1000Model
from udrv.models.pci import ModelPciTransport
from udrv.nic import Nic, NicOptions
from udrv.pciengine import PciNetError, PciRing
from udrv.pcinet import RingRegs
from udrv.pcitransport import MmioRegion

from frames import FakeTap, plain

needs_c = pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")

# 8254x ring registers (the test's own copy, from the manual) and igb's queue 0
E1000_RING = {0x2800: "RDBAL", 0x2804: "RDBAH", 0x2808: "RDLEN", 0x2810: "RDH", 0x2818: "RDT",
              0x3800: "TDBAL", 0x3804: "TDBAH", 0x3808: "TDLEN", 0x3810: "TDH", 0x3818: "TDT"}
IGB_Q0 = RingRegs(rdbal=0xC000, rdbah=0xC004, rdlen=0xC008, rdh=0xC010, rdt=0xC018,
                  tdbal=0xE000, tdbah=0xE004, tdlen=0xE008, tdh=0xE010, tdt=0xE018)
TO_MODEL = {IGB_Q0.rdbal: 0x2800, IGB_Q0.rdbah: 0x2804, IGB_Q0.rdlen: 0x2808, IGB_Q0.rdh: 0x2810,
            IGB_Q0.rdt: 0x2818, IGB_Q0.tdbal: 0x3800, IGB_Q0.tdbah: 0x3804, IGB_Q0.tdlen: 0x3808,
            IGB_Q0.tdh: 0x3810, IGB_Q0.tdt: 0x3818}
BAR_SIZE = 0x20000


class Remapped(E1000):
    name = "e1000-remapped"
    ring_regs = IGB_Q0


class RemapTransport(ModelPciTransport):
    """The model's ring registers at IGB_Q0's offsets; the e1000 ones answer nothing."""

    def __init__(self, model: E1000Model):
        super().__init__(model)
        self.writes: list[tuple[int, int]] = []

    def _where(self, offset: int) -> int:
        if offset in E1000_RING:
            raise AssertionError(f"{E1000_RING[offset]} ({offset:#x}) touched: the driver declared another map")
        return TO_MODEL.get(offset, offset)

    def read32(self, offset: int) -> int:
        return super().read32(self._where(offset))

    def write32(self, offset: int, value: int) -> None:
        self.writes.append((offset, value))
        super().write32(self._where(offset), value)


class Rig:
    def __init__(self, cls: type, sink=None, transport: ModelPciTransport | None = None):
        self.transport = transport or RemapTransport(E1000Model("82540em"))
        self.model = self.transport.model
        self.wire: list[bytes] = []
        self.host: list[bytes] = []
        self.model.on_transmit = lambda fr: self.wire.append(bytes(fr))
        self.nic = Nic(cls, self.transport, sink or self.host.append, NicOptions(n_rx=64, n_tx=64))
        self.nic.bring_up()
        self.nic.open()

    def close(self) -> None:
        self.nic.close()
        self.transport.close()


@pytest.fixture(params=["python", pytest.param("c", marks=needs_c)])
def cls(request):
    return Remapped if request.param == "python" else Remapped.c_variant()


def test_a_driver_declaring_another_register_map_gets_its_tail_writes_there(cls):
    r = Rig(cls)
    try:
        frames = [plain(i, 60 + 40 * i) for i in range(10)]
        assert r.nic.enqueue(frames) == 10
        r.nic.xmit()
        for _ in range(20):
            r.nic.poll(0.001)
        assert r.wire == frames
        for f in frames[:6]:
            assert r.model.wire_receive(f)
        for _ in range(20):
            r.nic.poll(0.001)
        assert r.host == frames[:6]
        e = r.nic.engine
        tails = {off for off, _ in r.transport.writes if off in (IGB_Q0.rdt, IGB_Q0.tdt)}
        assert tails == {IGB_Q0.rdt, IGB_Q0.tdt}
        assert r.model.reg(0x3818) == e.tx_next == 10 and r.model.reg(0x2818) == e.rx_tail
        assert r.nic.status()["tx_packets"] == 10 and r.nic.driver.invariants() == []
    finally:
        r.close()


def test_a_remapped_ring_recovers_from_a_datapath_fault_on_its_own_registers(cls):
    r = Rig(cls)
    try:
        r.nic.inject("poll", "raise")
        assert r.nic.enqueue([plain(1, 100), plain(2, 200)]) == 2
        r.nic.xmit()
        for _ in range(20):
            r.nic.poll(0.001)
        assert r.wire == [plain(1, 100), plain(2, 200)]
        assert r.nic.counters.recoveries >= 1 and r.nic.driver.invariants() == []
    finally:
        r.close()


class BarFdRemap(RemapTransport):
    """RemapTransport that also offers BAR0 as a memfd (what VFIO's device fd is to C)."""

    def __init__(self, model: E1000Model, size: int = BAR_SIZE):
        super().__init__(model)
        self.bar_fd = os.memfd_create("udrv-test-bar0")
        os.ftruncate(self.bar_fd, size)
        self.size = size

    def mmio_region(self) -> MmioRegion:
        return MmioRegion(fd=self.bar_fd, offset=0, size=self.size, mappable=True)

    def bar(self, reg: int) -> int:
        return struct.unpack("<I", os.pread(self.bar_fd, 4, reg))[0]

    def set_bar(self, reg: int, value: int) -> None:
        os.pwrite(self.bar_fd, struct.pack("<I", value), reg)

    def close(self) -> None:
        super().close()
        os.close(self.bar_fd)


@needs_c
def test_the_c_loop_writes_and_reads_the_registers_the_driver_declared():
    tap = FakeTap(False)
    model = E1000Model("82540em")
    t = BarFdRemap(model)
    r = Rig(Remapped.c_variant(), tap.write, t)
    try:
        assert r.nic.runs_in_c() and r.nic.engine.caps.runs_turns

        def turn() -> None:
            # the 'bus': model heads/tails into the BAR at the declared offsets, tails back after
            for ours, theirs in ((IGB_Q0.rdh, 0x2810), (IGB_Q0.rdt, 0x2818), (IGB_Q0.tdh, 0x3810),
                                 (IGB_Q0.tdt, 0x3818)):
                t.set_bar(ours, model.reg(theirs))
            r.nic.run(0.01, -1)
            for ours, theirs in ((IGB_Q0.rdt, 0x2818), (IGB_Q0.tdt, 0x3818)):
                if t.bar(ours) != model.reg(theirs):
                    model.mmio_write(theirs, t.bar(ours))

        frames = [plain(i, 80 + 10 * i) for i in range(12)]
        tap.inject(frames)
        turn()
        assert t.bar(IGB_Q0.tdt) == r.nic.engine.tx_next == 12
        assert r.wire == frames
        for f in frames[:5]:
            assert model.wire_receive(f)
        turn()
        tap.peer.setblocking(False)
        assert [tap.peer.recv(1 << 16) for _ in range(5)] == frames[:5]
        assert t.bar(IGB_Q0.rdt) == r.nic.engine.rx_tail
        assert all(t.bar(off) == 0 for off in E1000_RING)        # C never touched the e1000 map
        assert r.nic.engine.report().c_loop["tap_in"] == 12
    finally:
        r.close()
        tap.close()


@needs_c
def test_the_c_loop_refuses_a_bar_too_small_for_the_declared_registers():
    tap = FakeTap(False)
    t = BarFdRemap(E1000Model("82540em"), size=IGB_Q0.tdt)      # TDT would end 4 bytes past it
    r = Rig(Remapped.c_variant(), tap.write, t)
    try:
        with pytest.raises(PciNetError, match="too small"):
            r.nic.engine.run(0.01, -1)
    finally:
        r.close()
        tap.close()


def test_the_c_variant_is_made_once_and_only_for_a_codec_c_knows():
    c = E1000.c_variant()
    assert c is E1000.c_variant() and c.fast_path and c.__name__ == "E1000Native" and issubclass(c, E1000)
    assert c.c_variant() is None and Remapped.c_variant() is not c

    class OtherLayout(E1000Codec):
        c_layout = None

    class PythonOnly(E1000):
        codec = OtherLayout()

    assert PythonOnly.c_variant() is None and PythonOnly.implementations() == (PythonOnly,)


def contract_gaps(engine) -> list[str]:
    """Datapath members the engine lacks. tx_clock is None while the old runtime probes stand
    (it would take any tx_clock for a TX clock of the ring's own): isinstance(engine, Datapath)
    holds once that alias block is gone."""
    members = [m for m in dir(Datapath) if not m.startswith("_") and m not in ("tx_clock",)]
    members += list(Datapath.__annotations__)
    return [m for m in members if getattr(engine, m, None) is None]


def test_the_engine_follows_fast_path_and_answers_the_datapath_contract(monkeypatch):
    r = Rig(Remapped)
    try:
        e = r.nic.engine
        assert type(e) is PciRing and contract_gaps(e) == []
        assert e.caps == Capabilities(handles_vnet=True)
        assert e.tap_counts() == TapCounts() and e.pull_tap() == 0
        assert e.report() == DatapathReport(tx_offload={"csum": 0, "tso": 0, "software": 0})
    finally:
        r.close()
    if not fastpath.available():
        return
    tap = FakeTap(False)
    monkeypatch.setenv("UDRV_E1000_LOOP", "0")
    r = Rig(Remapped.c_variant(), tap.write, BarFdRemap(E1000Model("82540em")))
    try:
        e = r.nic.engine
        assert isinstance(e, PciRing) and type(e) is not PciRing and contract_gaps(e) == []
        assert e.caps == Capabilities(reads_tap=True, pulls_tap=True, handles_vnet=True)   # no turns in C
        tap.inject([plain(1, 70), plain(2, 90)])
        assert e.pull_tap() == 2 and e.tap_counts().frames_in == 2
        assert e.report().c_loop is None and e.report().rx_coalesce["on"] == 0
        e.close()
        assert not e.caps.reads_tap and e.tap_counts().frames_in == 2      # the counts outlive the reader
    finally:
        r.close()
        tap.close()
