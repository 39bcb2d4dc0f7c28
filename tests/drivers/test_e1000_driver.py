"""The e1000 driver against the e1000 device model (a black box behind ModelPciTransport).

Register offsets and bit values in the checks are literals from docs/reference/e1000.md and the
8254x datasheet, not the driver's constants: a test that imported them would agree with the
driver's misreadings."""
from __future__ import annotations

import gc
import time

import pytest

from udrv.driver import RxMode
from udrv.errors import UdrvError
from udrv.faults import KINDS
from udrv.models.pci import ModelPciTransport
from udrv.models.e1000 import E1000Model
from udrv.nic import Nic, NicOptions
from udrv import fastpath
from udrv.drivers import e1000 as drv
from udrv.drivers.e1000 import E1000

E1000Native = E1000.c_variant()     # the same driver on the C ring

VARIANTS = ("82540em", "82574l")
IMPLS = [pytest.param(E1000, id="py"),
         pytest.param(E1000Native, id="c", marks=pytest.mark.skipif(
             not fastpath.available(), reason=f"C fast path not built: {fastpath.why_unavailable()}"))]
MODEL_MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("02aabbccdd01")
NEW_MAC = bytes.fromhex("02c0ffee0001")
GROUP_A = bytes.fromhex("01005e000001")      # hash 0x010: MTA[0] bit 16
GROUP_B = bytes.fromhex("01005e0000fb")      # hash 0xfb0: MTA[125] bit 16
GROUP_C = bytes.fromhex("01005e7f0002")      # hash 0x020: MTA[1] bit 0 (not in the list)

# registers (literal offsets)
CTRL, STATUS, EERD, ICR, IMS = 0x0000, 0x0008, 0x0014, 0x00C0, 0x00D0
RCTL, TCTL, TIPG = 0x0100, 0x0400, 0x0410
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
MTA, RAL0, RAH0 = 0x5200, 0x5400, 0x5404


def frame(dst: bytes, n: int, payload: int = 60, src: bytes = PEER) -> bytes:
    body = n.to_bytes(4, "big") + bytes((n + i) & 0xFF for i in range(payload - 4))
    return dst + src + b"\x88\xb5" + body


class Spy:
    """A PciTransport that counts MMIO writes per register (wraps the model transport)."""

    def __init__(self, real):
        self._real = real
        self.writes: dict[int, int] = {}
        self.log: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def write32(self, offset, value):
        self.writes[offset] = self.writes.get(offset, 0) + 1
        self.log.append((offset, value))
        return self._real.write32(offset, value)

    def reset_counts(self):
        self.writes.clear()
        self.log.clear()


class Rig:
    def __init__(self, variant: str = "82540em", *, watchdog=None, spy: bool = False, model_kw=None,
                 cls=E1000, sink=None, **opts):
        self.model = E1000Model(variant, **(model_kw or {}))
        self.transport = ModelPciTransport(self.model)
        self.pci = Spy(self.transport) if spy else self.transport
        self.host_rx: list[bytes] = []
        self.wire_tx: list[bytes] = []
        self.model.on_transmit = lambda f: self.wire_tx.append(bytes(f))
        opts.setdefault("n_rx", 8)
        opts.setdefault("n_tx", 8)
        self.nic = Nic(cls, self.pci, sink or self.host_rx.append, NicOptions(**opts), watchdog=watchdog)

    @property
    def driver(self) -> E1000:
        return self.nic.driver

    @property
    def dp(self):
        return self.nic.engine

    def up(self) -> "Rig":
        self.nic.bring_up()
        self.nic.open()
        return self

    def pump(self, rounds: int = 4) -> None:
        """xmit/poll until the journal is drained (at least `rounds` times)."""
        for i in range(200):
            self.nic.xmit()
            self.nic.poll(0.0)
            if i >= rounds and self.nic.journal.unconfirmed() == 0:
                break

    def send(self, frames: list[bytes]) -> None:
        self.nic.enqueue(frames)
        self.pump()

    def receive(self, frames: list[bytes]) -> list[bool]:
        took = []
        for f in frames:
            took.append(self.model.wire_receive(f))
            self.nic.poll(0.0)
        return took

    def rx_descriptor_addresses(self) -> list[int]:
        mem = self.driver.rings
        v = mem.rx_ring.view
        return [int.from_bytes(v[i * 16:i * 16 + 8], "little") for i in range(mem.rx_count)]

    def close(self) -> None:
        self.nic.close()
        self.transport.close()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(params=VARIANTS)
def rig(request, impl):
    r = Rig(request.param, cls=impl).up()
    yield r
    r.close()


@pytest.fixture
def wrig(watchdog, impl):
    r = Rig(watchdog=watchdog, config_deadline=0.3, datapath_deadline=0.4, cls=impl).up()
    yield r
    r.close()


# --- identity ---------------------------------------------------------------------------------------
def test_id_table():
    ids = {(i.vendor, i.device): i for i in drv.E1000_IDS}
    assert (0x8086, 0x100E) in ids and (0x8086, 0x10D3) in ids
    assert ids[(0x8086, 0x10D3)].flags & drv.E1000E
    assert not ids[(0x8086, 0x100E)].flags & drv.E1000E
    assert not ids[(0x8086, 0x150C)].flags & drv.JUMBO          # 82583V: no jumbo frames
    assert ids[(0x8086, 0x1010)].flags & drv.DUAL_PORT
    assert len(ids) >= 8


def test_unknown_device_is_refused_with_a_reason():
    r = Rig()
    r.driver.ident = None
    with pytest.raises(UdrvError, match="is not an Intel e1000"):
        r.driver.bind()
    r.close()


# --- bring-up ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_bringup_registers(variant):
    r = Rig(variant)
    r.nic.bring_up()
    m = r.model
    assert r.transport.config_read(0x04, 2) & 0x4, "bus mastering enabled by bind"
    assert r.driver.mac == MODEL_MAC
    assert m.reg(CTRL) & 0x40 and not m.reg(CTRL) & 0x04000000          # SLU, not in reset
    assert m.reg(IMS) == 0                                               # polled: nothing unmasked
    assert m.reg(RAL0) == int.from_bytes(MODEL_MAC[:4], "little")
    assert m.reg(RAH0) == int.from_bytes(MODEL_MAC[4:], "little") | 0x80000000
    assert all(m.reg(MTA + 4 * i) == 0 for i in range(128))             # undefined at power-on
    assert not m.reg(RCTL) & 0x2 and not m.reg(TCTL) & 0x2               # closed: RX/TX off
    assert r.nic.link_check().up and r.nic.link.speed == 1000 and r.nic.link.full_duplex
    assert m.dmar_faults == 0
    r.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_open_programs_rings_and_enables(variant):
    r = Rig(variant, n_rx=16, n_tx=24).up()
    m, s, mem = r.model, r.driver.soft, r.driver.rings
    assert (s.rx_count, s.tx_count) == (16, 24)
    assert m.reg(RDBAL) | m.reg(RDBAH) << 32 == mem.rx_ring.iova
    assert m.reg(TDBAL) | m.reg(TDBAH) << 32 == mem.tx_ring.iova
    assert m.reg(RDLEN) == 16 * 16 and m.reg(TDLEN) == 24 * 16
    assert m.reg(RDLEN) % 128 == 0 and m.reg(TDLEN) % 128 == 0
    assert m.reg(RDH) == 0 and m.reg(RDT) == 15                          # N-1 buffers handed over
    assert m.reg(TDH) == 0 and m.reg(TDT) == 0
    rctl = m.reg(RCTL)
    assert rctl & 0x2 and rctl & 0x8000 and rctl & 0x04000000            # EN, BAM, SECRC
    assert rctl & 0x00030000 == 0 and not rctl & 0x02000000              # 2048-byte buffers
    assert not rctl & (0x8 | 0x10 | 0x20)                                # no UPE/MPE/LPE
    assert rctl & 0x3000 == 0                                            # MO = 00
    tctl = m.reg(TCTL)
    assert tctl & 0x2 and tctl & 0x8                                     # EN, PSP
    assert (tctl >> 4) & 0xFF == 15 and (tctl >> 12) & 0x3FF == 63       # CT, COLD
    assert m.reg(TIPG) & 0x3FF == 8
    # every RX descriptor points into our RX buffer area, descriptor i at buffer i
    addrs = r.rx_descriptor_addresses()
    assert addrs == [mem.rx_bufs.iova + i * 2048 for i in range(16)]
    assert m.dmar_faults == 0
    r.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_mac_from_eeprom_when_ral_invalid(variant):
    """QEMU's reset leaves RAL/RAH as they were; with RAH0.AV clear the driver must read the
    EEPROM through EERD (whose layout differs between 82540 and 82574)."""
    r = Rig(variant, model_kw={"qemu_reset_quirk": True})
    r.nic.guard.config("bind")
    r.transport.write32(RAH0, 0)
    r.transport.write32(RAL0, 0)
    r.nic.guard.config("probe")
    assert r.driver.mac == MODEL_MAC
    assert r.model.reg(RAH0) & 0x80000000
    r.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_cleans_stale_state_when_reset_does_nothing(variant):
    """QEMU's CTRL.RST only clears the bit: whatever a previous owner left (RX on, promiscuous,
    a second address filter, multicast bits, ring pointers, unmasked interrupts) must be
    cleaned by the driver itself."""
    stale = bytes.fromhex("02deadbeef01")
    r = Rig(variant, model_kw={"qemu_reset_quirk": True})
    t = r.transport
    t.config_write(0x04, 2, t.config_read(0x04, 2) | 0x4)
    for reg, value in ((RDBAL, 0x1000_0000), (RDLEN, 4096), (TDBAL, 0x1000_0000), (TDLEN, 4096),
                       (RCTL, 0x2 | 0x8 | 0x10), (TCTL, 0x2 | 0x8), (MTA + 4 * 5, 0xFFFF), (IMS, 0x9D),
                       (RAL0 + 8, int.from_bytes(stale[:4], "little")),
                       (RAH0 + 8, int.from_bytes(stale[4:], "little") | 0x80000000)):
        t.write32(reg, value)
    r.nic.bring_up()
    m = r.model
    assert not m.reg(RCTL) & 0x1A and not m.reg(TCTL) & 0x2
    assert m.reg(IMS) == 0 and m.reg(RDLEN) == 0 and m.reg(TDLEN) == 0
    assert all(m.reg(MTA + 4 * i) == 0 for i in range(128))
    assert not m.reg(RAH0 + 8) & 0x80000000
    r.nic.open()
    assert r.receive([frame(stale, 1), frame(r.driver.mac, 2)]) == [False, True]
    assert m.dmar_faults == 0
    r.close()


# --- datapath ---------------------------------------------------------------------------------------
def test_tx_byte_exact_in_order(rig):
    frames = [frame(PEER, i, payload=46 + 17 * i) for i in range(40)]
    rig.send(frames)
    assert rig.wire_tx == frames
    assert rig.nic.journal.unconfirmed() == 0
    c = rig.dp.counters
    assert c.tx_packets == 40 and c.tx_bytes == sum(map(len, frames))


def test_rx_byte_exact_in_order(rig):
    frames = [frame(rig.driver.mac, i, payload=46 + 23 * i) for i in range(40)]
    assert all(rig.receive(frames))
    assert rig.host_rx == frames
    assert rig.dp.counters.rx_packets == 40


def test_short_tx_frames_are_padded_by_the_device(rig):
    f = rig.driver.mac[:0] + PEER + rig.driver.mac + b"\x08\x06" + b"\x01" * 28    # 42-byte ARP
    rig.send([f])
    assert len(rig.wire_tx) == 1 and rig.wire_tx[0][:42] == f and len(rig.wire_tx[0]) >= 60


@pytest.mark.parametrize("batch", [1, 3, 7, 5])
def test_ring_wraparound_both_ways(batch, impl):
    """8-descriptor rings, 7 usable: indices wrap many times with batches that do not divide 8."""
    r = Rig(spy=True, cls=impl).up()
    sent, received = [], []
    for k in range(12):
        tx = [frame(PEER, 1000 * k + i) for i in range(batch)]
        rx = [frame(r.driver.mac, 1000 * k + i) for i in range(batch)]
        r.pci.reset_counts()
        r.nic.enqueue(tx)
        assert r.nic.xmit() == batch
        assert r.pci.writes.get(TDT) == 1, "one TDT write per batch"
        for f in rx:
            assert r.model.wire_receive(f)
        r.pci.reset_counts()
        r.nic.poll()
        assert r.pci.writes.get(RDT) == 1, "one RDT write per batch"
        sent += tx
        received += rx
        dp = r.dp
        assert 0 <= dp.rx_next < 8 and 0 <= dp.tx_next < 8
        assert r.model.reg(RDT) == (dp.rx_next - 1) % 8
        assert r.model.reg(TDT) == dp.tx_next
    assert r.wire_tx == sent and r.host_rx == received
    assert r.nic.journal.unconfirmed() == 0
    assert r.driver.invariants() == []
    assert r.model.dmar_faults == 0
    r.close()


def test_rx_more_frames_than_ring_waits_in_device_fifo(impl):
    r = Rig(cls=impl).up()
    frames = [frame(r.driver.mac, i) for i in range(30)]
    for f in frames:
        r.model.wire_receive(f)          # no polling: ring fills, the rest waits in the FIFO
    for _ in range(10):
        r.nic.poll()
    assert r.host_rx == frames
    r.close()


def test_tx_ring_full_leaves_frames_in_journal(impl):
    r = Rig(cls=impl).up()
    r.model.faults.tx_hang = True            # the device stops processing descriptors
    frames = [frame(PEER, i) for i in range(20)]
    r.nic.enqueue(frames)
    assert r.nic.xmit() == 7                 # N-1 descriptors
    assert r.nic.xmit() == 0
    assert r.nic.journal.unsent() == 13
    r.model.faults.tx_hang = False
    r.close()


def test_invalid_tx_frames_are_counted_and_confirmed_in_order(impl):
    r = Rig(cls=impl).up()
    good = [frame(PEER, i) for i in range(3)]
    r.nic.enqueue([good[0], b"\x01" * 10, good[1], b"", good[2]])
    r.pump()
    assert r.wire_tx == good
    assert r.dp.counters.tx_errors == {"runt": 2}
    assert r.nic.journal.unconfirmed() == 0
    r.close()


# --- RX mode ----------------------------------------------------------------------------------------
def test_unicast_filter_and_broadcast(rig):
    other = bytes.fromhex("02ddeeff0011")
    took = rig.receive([frame(rig.driver.mac, 1), frame(other, 2), frame(b"\xff" * 6, 3)])
    assert took == [True, False, True]
    assert [f[14:18] for f in rig.host_rx] == [(1).to_bytes(4, "big"), (3).to_bytes(4, "big")]


def test_promiscuous_and_allmulti(rig):
    other = bytes.fromhex("02ddeeff0011")
    rig.nic.set_rx_mode(RxMode(promisc=True))
    assert rig.model.reg(RCTL) & 0x18 == 0x18
    assert rig.receive([frame(other, 1), frame(GROUP_C, 2)]) == [True, True]
    rig.nic.set_rx_mode(RxMode(allmulti=True))
    rctl = rig.model.reg(RCTL)
    assert rctl & 0x10 and not rctl & 0x8
    assert rig.receive([frame(other, 3), frame(GROUP_C, 4)]) == [False, True]
    rig.nic.set_rx_mode(RxMode())
    assert rig.model.reg(RCTL) & 0x18 == 0
    assert rig.receive([frame(GROUP_C, 5)]) == [False]


def test_multicast_list_programs_the_mta_hash(rig):
    rig.nic.set_rx_mode(RxMode(multicast=(GROUP_A, GROUP_B)))
    m = rig.model
    words = {i: m.reg(MTA + 4 * i) for i in range(128) if m.reg(MTA + 4 * i)}
    assert words == {0: 1 << 16, 125: 1 << 16}
    assert not m.reg(RCTL) & 0x18
    assert rig.receive([frame(GROUP_A, 1), frame(GROUP_B, 2), frame(GROUP_C, 3)]) == [True, True, False]
    rig.nic.set_rx_mode(RxMode())
    assert all(m.reg(MTA + 4 * i) == 0 for i in range(128))


def test_rx_mode_rejects_non_multicast_entries(rig):
    with pytest.raises(UdrvError):
        rig.nic.set_rx_mode(RxMode(multicast=(NEW_MAC,)))
    assert rig.driver.soft.mode == RxMode()


def test_mta_hash_helper():
    assert drv.mta_hash(GROUP_A) == 0x010
    assert drv.mta_hash(GROUP_B) == 0xFB0
    assert drv.mta_hash(bytes.fromhex("0100000000ff")) == 0xFF0


# --- MAC, MTU, counters -------------------------------------------------------------------------------
def test_set_mac(rig):
    rig.nic.set_mac(NEW_MAC)
    assert rig.model.reg(RAL0) == int.from_bytes(NEW_MAC[:4], "little")
    assert rig.model.reg(RAH0) == int.from_bytes(NEW_MAC[4:], "little") | 0x80000000
    assert rig.receive([frame(NEW_MAC, 1), frame(MODEL_MAC, 2)]) == [True, False]
    with pytest.raises(UdrvError):
        rig.nic.set_mac(GROUP_A)


def test_jumbo_mtu_rx(rig):
    rig.nic.set_mtu(9000)
    rctl = rig.model.reg(RCTL)
    assert rctl & 0x20                                    # LPE
    assert rctl & 0x02030000 == 0x02010000                # BSEX, 16384-byte buffers
    assert rig.driver.soft.rx_bufsize == 16384
    big = frame(rig.driver.mac, 7, payload=9000)
    assert rig.receive([big]) == [True]
    assert rig.host_rx == [big]
    rig.send([frame(PEER, 1)])                            # TX still works on the new rings
    assert len(rig.wire_tx) == 1
    rig.nic.set_mtu(1500)
    assert not rig.model.reg(RCTL) & 0x20 and rig.driver.soft.rx_bufsize == 2048
    assert rig.model.dmar_faults == 0


def test_mtu_limits(rig):
    for bad in (67, 9001):
        with pytest.raises(UdrvError):
            rig.nic.set_mtu(bad)
    assert rig.driver.soft.mtu == 1500


def test_hardware_counters_accumulate(rig):
    tx = [frame(PEER, i) for i in range(5)]
    rx = [frame(rig.driver.mac, i) for i in range(3)]
    rig.send(tx)
    rig.receive(rx)
    st = rig.driver.stats().extra
    assert st["gptc"] == 5 and st["tpt"] == 5
    assert st["gprc"] == 3 and st["tpr"] == 3
    assert st["gotc"] >= sum(map(len, tx)) and st["gorc"] >= sum(map(len, rx))
    rig.send(tx[:2])
    st = rig.driver.stats().extra                         # clear-on-read folded into totals
    assert st["gptc"] == 7


def test_missed_packets_when_ring_and_fifo_are_full():
    r = Rig(model_kw={"rx_fifo_bytes": 2048}).up()
    for i in range(40):
        r.model.wire_receive(frame(r.driver.mac, i))
    st = r.driver.stats()
    assert st.rx_missed > 0
    r.close()


# --- bad input from the device ------------------------------------------------------------------------
def test_bad_rx_length_is_dropped_and_counted(impl):
    r = Rig(cls=impl).up()
    r.model.faults.rx_bad_length = 2
    r.receive([frame(r.driver.mac, i) for i in range(4)])
    assert sum(r.dp.counters.rx_dropped.values()) == 2
    assert len(r.host_rx) == 2
    r.model.faults.rx_bad_length = 1
    r.model.faults.rx_bad_length_value = 0
    r.receive([frame(r.driver.mac, 9)])
    assert r.dp.counters.rx_dropped.get("zero_length") == 1
    assert r.nic.counters.recoveries == 0
    r.close()


@pytest.mark.parametrize("queue", ["rx", "tx"])
def test_spurious_dd_on_a_descriptor_never_handed_out(queue, impl):
    r = Rig(cls=impl).up()
    r.receive([frame(r.driver.mac, 1)])
    r.model.inject_spurious_dd(queue)
    r.nic.poll()
    counted = r.dp.counters.rx_dropped if queue == "rx" else r.dp.counters.tx_errors
    assert counted.get("dd_not_armed") == 1
    r.receive([frame(r.driver.mac, 2)])
    r.send([frame(PEER, 3)])
    assert len(r.host_rx) == 2 and len(r.wire_tx) == 1
    r.close()


def test_lost_completions_do_not_stall_the_rings(impl):
    r = Rig(cls=impl).up()
    r.model.faults.drop_tx_completions = 2
    r.model.faults.drop_rx_completions = 2
    tx = [frame(PEER, i) for i in range(5)]
    rx = [frame(r.driver.mac, i) for i in range(5)]
    r.send(tx)
    r.receive(rx)
    r.pump()
    assert r.wire_tx == tx and r.nic.journal.unconfirmed() == 0      # no re-send needed
    assert r.host_rx == rx[2:]
    assert r.dp.counters.rx_dropped.get("completion_lost") == 2
    r.close()


def test_head_beyond_ring_is_a_fault_and_recovers(wrig):
    wrig.model.faults.head_beyond_ring = True
    wrig.model.wire_receive(frame(wrig.driver.mac, 1))
    for _ in range(3):
        wrig.nic.poll()
    wrig.model.faults.head_beyond_ring = False
    assert any("beyond" in rec.detail for rec in wrig.nic.recoveries)
    wrig.receive([frame(wrig.driver.mac, 2)])
    wrig.send([frame(PEER, 3)])
    assert wrig.host_rx[-1] == frame(wrig.driver.mac, 2) and wrig.wire_tx[-1] == frame(PEER, 3)
    assert wrig.model.dmar_faults == 0


def test_surprise_removal_is_reported_as_device_gone(impl):
    r = Rig(cls=impl).up()
    r.model.surprise_remove()
    r.nic.poll()
    assert r.nic.state == "down"
    assert "stopped answering" in r.nic.recoveries[0].detail
    assert r.nic.recoveries[0].fault == "disconnect"
    r.close()


def test_no_descriptor_points_outside_our_buffers_after_faults(wrig):
    for kind in ("raise", "hang", "stall", "disconnect"):
        wrig.nic.inject("poll", kind)
        wrig.receive([frame(wrig.driver.mac, 1)])
        mem = wrig.driver.rings
        lo, hi = mem.rx_bufs.iova, mem.rx_bufs.iova + mem.rx_count * mem.rx_bufsize
        assert all(lo <= a < hi for a in wrig.rx_descriptor_addresses())
    assert wrig.model.dmar_faults == 0


# --- checkpoint / restore -----------------------------------------------------------------------------
def test_checkpoint_is_config_reads_only():
    r = Rig(spy=True).up()
    r.pci.reset_counts()
    cp = r.driver.checkpoint()
    assert r.pci.log == []
    assert cp.opened and cp.mac == MODEL_MAC and cp.rx_ring_iova == r.driver.rings.rx_ring.iova
    r.close()


def test_light_restore_does_not_rewrite_rctl():
    """QEMU holds RX off for ~1 s after an RCTL write: a restore of a sane device must not."""
    r = Rig(spy=True).up()
    r.nic.set_rx_mode(RxMode(multicast=(GROUP_A,)))
    cp = r.nic.guard.checkpoint
    r.pci.reset_counts()
    r.driver.restore(cp)
    assert RCTL not in r.pci.writes and TCTL not in r.pci.writes and CTRL not in r.pci.writes
    assert r.driver.restores == {"light": 1, "full": 0}
    r.close()


def test_restore_after_device_lost_state_takes_the_full_path(impl):
    r = Rig(cls=impl).up()
    r.nic.set_mac(NEW_MAC)
    r.nic.set_rx_mode(RxMode(allmulti=True))
    r.send([frame(PEER, 0)])
    r.model.function_reset()                 # registers back to power-on behind the driver's back
    r.nic.enqueue([frame(PEER, 1)])
    r.nic.xmit()
    time.sleep(0.55)
    assert not r.nic.check_tx_progress()     # the TX hang detector notices
    r.pump()
    assert r.driver.restores["full"] == 1
    assert r.wire_tx[-1] == frame(PEER, 1)
    m = r.model
    assert m.reg(RAL0) == int.from_bytes(NEW_MAC[:4], "little") and m.reg(RAH0) & 0x80000000
    assert m.reg(RCTL) & 0x12 == 0x12 and m.reg(CTRL) & 0x40
    assert r.receive([frame(GROUP_C, 5)]) == [True]
    r.close()


def test_a_link_check_on_a_device_reset_behind_its_back_restores_it_in_full(impl):
    r = Rig(cls=impl).up()
    r.nic.set_mac(NEW_MAC)
    r.model.function_reset()                 # between two of the daemon's link ticks
    link = r.nic.link_check()                # the tick: SLU is gone, which only a reset does
    assert link.up and r.driver.restores["full"] == 1
    rec = r.nic.recoveries[-1]
    assert (rec.entry, rec.fault, rec.outcome) == ("link_check", "device_reset", "recovered"), rec
    m = r.model
    assert m.reg(RAL0) == int.from_bytes(NEW_MAC[:4], "little") and m.reg(RAH0) & 0x80000000
    r.send([frame(PEER, 3)])
    assert r.wire_tx[-1] == frame(PEER, 3)   # the rings are the driver's again
    r.close()


def test_tx_hang_detected_and_journal_reissued(impl):
    r = Rig(cls=impl).up()
    r.model.faults.tx_hang = True
    frames = [frame(PEER, i) for i in range(4)]
    r.nic.enqueue(frames)
    r.pump()
    assert r.wire_tx == []
    r.model.faults.tx_hang = False
    time.sleep(0.55)
    assert not r.nic.check_tx_progress()
    r.pump()
    assert r.wire_tx == frames and r.nic.journal.unconfirmed() == 0
    assert r.nic.recoveries[-1].reissued == 4
    r.close()


def traffic_works(r, n: int = 3) -> None:
    base_tx, base_rx = len(r.wire_tx), len(r.host_rx)
    tx = [frame(PEER, 500 + i) for i in range(n)]
    rx = [frame(r.driver.mac, 600 + i) for i in range(n)]
    r.send(tx)
    r.receive(rx)
    why = [rec.line() for rec in r.nic.recoveries]
    assert r.wire_tx[base_tx:] == tx, why
    assert r.host_rx[base_rx:] == rx, why


def test_no_leaks_after_100_recoveries(wrig):
    traffic_works(wrig)
    gc.collect()
    maps, actions = len(wrig.transport.dma_mappings()), len(wrig.nic.actions)
    for i in range(100):
        entry = ("xmit", "poll", "set_rx_mode", "set_mac")[i % 4]
        kind = ("raise", "stall", "disconnect", "corrupt")[i % 4] if entry.startswith("set") else "raise"
        wrig.nic.inject(entry, kind)
        wrig.nic.guard._recent_dp_faults.clear()     # this test is about leaks, not the escalation policy
        if entry == "set_rx_mode":
            wrig.nic.set_rx_mode(RxMode(multicast=(GROUP_A,)) if i % 8 < 4 else RxMode())
        elif entry == "set_mac":
            wrig.nic.set_mac(NEW_MAC if i % 8 < 4 else MODEL_MAC)
        else:
            wrig.send([frame(PEER, i)])
    traffic_works(wrig)
    gc.collect()
    assert wrig.nic.counters.recoveries >= 100
    assert len(wrig.transport.dma_mappings()) == maps
    assert len(wrig.nic.actions) == actions
    assert wrig.nic.counters.escalations == 0
    assert wrig.model.dmar_faults == 0


# --- the C ring against the Python ring ----------------------------------------------------------------
def _traffic_script(r: Rig) -> None:
    """Everything both rings must treat alike: wrap-around, odd sizes, bad lengths, lost
    completions, spurious DD, invalid TX frames, a datapath fault and its re-issue."""
    mac = r.driver.mac
    tx = [frame(PEER, i, payload=46 + (i * 37) % 1400) for i in range(60)]
    rx = [frame(mac, i, payload=46 + (i * 53) % 1400) for i in range(60)]
    r.nic.enqueue(tx[:25] + [b"\x02" * 8] + tx[25:30])
    r.pump()
    r.receive(rx[:20])
    r.model.faults.rx_bad_length = 2
    r.model.faults.drop_rx_completions = 1
    r.model.faults.drop_tx_completions = 1
    r.receive(rx[20:40])
    r.model.inject_spurious_dd("rx")
    r.nic.poll()
    r.nic.inject("xmit", "raise")
    r.send(tx[30:])
    for f in rx[40:]:
        r.model.wire_receive(f)          # more than the ring: the FIFO holds the rest
    r.pump(10)


@pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")
@pytest.mark.parametrize("variant", VARIANTS)
def test_c_ring_and_python_ring_give_identical_frames(watchdog, variant):
    results = []
    for cls in (E1000, E1000Native):
        r = Rig(variant, cls=cls, watchdog=watchdog).up()
        _traffic_script(r)
        c = r.dp.counters
        results.append((r.wire_tx, r.host_rx, c.rx_packets, c.tx_packets, c.rx_dropped, c.tx_errors,
                        r.nic.journal.unconfirmed(), r.nic.journal.reissued,
                        (r.dp.rx_next, r.dp.rx_tail, r.dp.tx_next, r.dp.tx_clean)))
        assert r.model.dmar_faults == 0
        r.close()
    py, c = results
    assert py == c
    assert len(py[1]) > 40 and py[6] == 0


@pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")
def test_c_ring_writes_rx_frames_to_the_tap_fd():
    import os
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    class FakeTap:                      # what the daemon passes: a TAP's bound write()
        vnet_hdr_len = 0

        def fileno(self):
            return a.fileno()

        def write(self, f):
            os.write(a.fileno(), f)

    r = Rig(cls=E1000Native, sink=FakeTap().write).up()
    assert r.dp.caps.reads_tap
    frames = [frame(r.driver.mac, i, payload=46 + 31 * i) for i in range(30)]
    for f in frames:
        r.model.wire_receive(f)
        r.nic.poll()
    b.setblocking(False)
    got = []
    while True:
        try:
            got.append(b.recv(65536))
        except BlockingIOError:
            break
    assert got == frames and r.host_rx == []
    assert r.dp.counters.rx_packets == 30
    r.close()
    a.close()
    b.close()
