"""The Pegasus device model, driven through ModelUsbTransport with literal request values
from docs/reference/pegasus.md (never through a driver, never with the model's own constants)."""
from __future__ import annotations

import zlib

import pytest

from udrv.errors import DeviceGone, Stall, TransferTimeout
from udrv.models.usb import ModelUsbTransport
from udrv.models.pegasus import PegasusModel
from udrv.usbtransport import EpType, XferStatus

MAC = bytes.fromhex("02a685150001")     # the model's default
OTHER = bytes.fromhex("02bbbbbbbb02")
PEER = bytes.fromhex("02cccccccc03")


# --- literal requests from the reference ---------------------------------------------------------
def get_regs(t, index, n):
    return t.control_in(0xC0, 0xF0, 0, index, n, 1.0)


def set_regs(t, index, data):
    t.control_out(0x40, 0xF1, 0, index, bytes(data), 1.0)


def set_reg(t, index, value):
    t.control_out(0x40, 0xF1, value, index, bytes([value]), 1.0)


def poll(t, reg, bit, limit=10):
    """Poll a register for `bit`; returns (reads it took, last value)."""
    for i in range(1, limit + 1):
        v = get_regs(t, reg, 1)[0]
        if v & bit:
            return i, v
    raise AssertionError(f"bit 0x{bit:02x} never set in register 0x{reg:02x}")


def eeprom_read(t, i):
    set_reg(t, 0x23, 0)
    set_reg(t, 0x20, i)
    set_reg(t, 0x23, 0x02)          # READ
    poll(t, 0x23, 0x04)             # DONE
    d = get_regs(t, 0x21, 2)
    return d[0] | d[1] << 8


def mii_read(t, phy, reg):
    set_reg(t, 0x28, 0)
    set_regs(t, 0x25, [phy, 0, 0, reg])
    set_reg(t, 0x28, reg | 0x40)    # READ
    poll(t, 0x28, 0x80)             # DONE
    d = get_regs(t, 0x26, 2)
    return d[0] | d[1] << 8


def mii_write(t, phy, reg, value):
    set_reg(t, 0x28, 0)
    set_regs(t, 0x25, [phy, value & 0xFF, value >> 8, reg])
    set_reg(t, 0x28, reg | 0x20)    # WRITE
    poll(t, 0x28, 0x80)


def enable(t, ctrl0=0xC8, ctrl1=0x30, ctrl2=0x01):
    set_regs(t, 0x00, [ctrl0, ctrl1, ctrl2])


def frame(dst, n=60, src=PEER, fill=0x5A):
    return dst + src + b"\x08\x00" + bytes([fill]) * (n - 14)


def rx(t, length=1536):
    t.submit_in(0x81, length, 1)
    done = t.reap(0)
    assert len(done) == 1, done
    return done[0]


def rx_none(t):
    t.submit_in(0x81, 1536, 99)
    assert t.reap(0) == []
    t.cancel_all()
    t.reap(0)


def tx(t, data):
    t.submit_out(0x02, data, 2)
    done = t.reap(0)
    assert len(done) == 1
    return done[0]


def intr(t):
    t.submit_in(0x83, 8, 3)
    done = t.reap(0)
    return done[0] if done else None


@pytest.fixture
def model():
    return PegasusModel()


@pytest.fixture
def t(model):
    tr = ModelUsbTransport(model)
    yield tr
    tr.close()


def sent_frames(model):
    out = []
    model.on_transmit = out.append
    return out


# --- identity ------------------------------------------------------------------------------------
def test_device_info_8515_high_speed(model):
    info = model.info
    assert (info.vid, info.pid, info.speed) == (0x07A6, 0x8515, "high")
    assert (info.bus, info.address, info.port_path) == (1, 2, (1,))
    (itf,) = info.interfaces
    assert itf.cls == 0xFF
    eps = {e.address: e for e in itf.endpoints}
    assert set(eps) == {0x81, 0x02, 0x83}
    assert (eps[0x81].type, eps[0x81].max_packet) == (EpType.BULK, 512)
    assert (eps[0x02].type, eps[0x02].max_packet) == (EpType.BULK, 512)
    assert (eps[0x83].type, eps[0x83].max_packet) == (EpType.INTERRUPT, 8)
    assert eps[0x83].interval == model.eeprom[4] >> 8 == 8


def test_device_info_full_speed_and_interval_from_eeprom():
    m = PegasusModel(pid=0x8513, interrupt_interval=0x80)
    eps = {e.address: e for e in m.info.interfaces[0].endpoints}
    assert m.info.speed == "full"
    assert eps[0x81].max_packet == 64
    assert eps[0x83].interval == 0x80
    assert m.eeprom[4] == 0x8000


# --- registers -------------------------------------------------------------------------------------
def test_get_and_set_registers(t, model):
    set_regs(t, 0x08, bytes(range(1, 9)))
    assert get_regs(t, 0x08, 8) == bytes(range(1, 9))
    assert model.regs[0x08:0x10] == bytes(range(1, 9))
    set_regs(t, 0x10, OTHER)
    assert get_regs(t, 0x10, 6) == OTHER
    assert model.mac == OTHER
    setup, data = model.request_log[-1]
    assert (setup.request_type, setup.request, setup.value, setup.index, setup.length) == (0xC0, 0xF0, 0, 0x10, 6)
    for r, v in ((0x7E, 0x24), (0x7F, 0x26), (0x1D, 0), (0x7B, 2), (0x78, 0x04), (0x80, 0xC0), (0x84, 1), (0x81, 2)):
        set_reg(t, r, v)
        assert model.reg(r) == v


def test_set_one_register_takes_wvalue_not_data(t, model):
    t.control_out(0x40, 0xF1, 0x26, 0x7F, b"\x00", 1.0)
    assert model.reg(0x7F) == 0x26
    assert model.counters.set_one_data_mismatch == 1
    # A "set registers" of length 1 with wValue 0 writes 0: the data byte is ignored.
    set_regs(t, 0x7E, [0x24])
    assert model.reg(0x7E) == 0x00


def test_bad_requests_stall(t, model):
    with pytest.raises(Stall):
        t.control_in(0xC0, 0xF2, 0, 0, 1, 1.0)
    with pytest.raises(Stall):
        t.control_out(0x40, 0xF3, 0, 0, b"\x01\x02", 1.0)
    with pytest.raises(Stall):
        get_regs(t, 0xFF, 2)               # past the 256-byte register file
    assert model.counters.unknown_requests == 2
    assert model.counters.control_stalls == 3
    assert get_regs(t, 0x00, 1) == b"\x00"  # endpoint 0 still works


# --- EEPROM ------------------------------------------------------------------------------------------
def test_eeprom_read_mac_and_interval(t):
    words = [eeprom_read(t, i) for i in range(3)]
    assert b"".join(w.to_bytes(2, "little") for w in words) == MAC
    assert eeprom_read(t, 4) >> 8 == 8


def test_eeprom_done_only_after_poll(t, model):
    set_reg(t, 0x23, 0)
    set_reg(t, 0x20, 1)
    set_reg(t, 0x23, 0x02)
    assert get_regs(t, 0x21, 2) == b"\x00\x00"      # data not there before completion
    first = get_regs(t, 0x23, 1)[0]
    assert first & 0x04 == 0                        # busy on the first poll (default 1 read)
    assert get_regs(t, 0x23, 1)[0] & 0x04
    assert get_regs(t, 0x21, 2) == MAC[2:4]


def test_eeprom_write_needs_write_enable(t, model):
    def write_word(i, w):
        set_reg(t, 0x20, i)
        set_regs(t, 0x21, w.to_bytes(2, "little"))
        set_reg(t, 0x23, 0x01)                      # WRITE
        poll(t, 0x23, 0x04)
    write_word(10, 0x1234)
    assert model.eeprom[10] == 0xFFFF
    assert model.counters.eeprom_writes_blocked == 1
    set_reg(t, 0x02, 0x10)                          # EthCtrl2 EEPROM write enable
    write_word(10, 0x1234)
    assert model.eeprom[10] == 0x1234
    assert eeprom_read(t, 10) == 0x1234


def test_pegasus_ii_preloads_ethid_pegasus_i_does_not():
    m2 = PegasusModel()
    t2 = ModelUsbTransport(m2)
    assert get_regs(t2, 0x10, 6) == MAC
    m1 = PegasusModel(pid=0x4001, vid=0x2001, pegasus_ii=False)
    t1 = ModelUsbTransport(m1)
    assert get_regs(t1, 0x10, 6) == bytes(6)
    t1.close()
    t2.close()


# --- MII -----------------------------------------------------------------------------------------------
def test_mii_bmsr_lpa_at_phy1_and_nothing_elsewhere(t, model):
    assert mii_read(t, 1, 1) == 0x782D      # caps 0x7809 + link 0x0004 + AN complete 0x0020
    assert mii_read(t, 1, 5) == 0x4101      # ACK + 100 full + CSMA
    assert mii_read(t, 1, 4) == 0x01E1
    assert mii_read(t, 1, 0) == 0x3000
    assert (mii_read(t, 1, 2), mii_read(t, 1, 3)) == model.phy_id
    assert mii_read(t, 0, 1) == 0xFFFF
    assert mii_read(t, 7, 1) == 0xFFFF
    # The reference's PHY probe: first address whose BMSR is neither 0 nor 0xFFFF.
    found = next(p for p in range(32) if mii_read(t, p, 1) not in (0, 0xFFFF))
    assert found == 1


def test_mii_write_and_bmcr_reset(t, model):
    mii_write(t, 1, 4, 0x0061)
    assert mii_read(t, 1, 4) == 0x0061
    mii_write(t, 1, 0x1B, 0x0004)
    assert model.phy_reg(0x1B) == 0x0004
    mii_write(t, 1, 1, 0x0000)              # BMSR is read-only
    assert mii_read(t, 1, 1) == 0x782D
    mii_write(t, 1, 0, 0x8000)              # BMCR reset: self-clearing, defaults back
    assert mii_read(t, 1, 0) == 0x3000
    assert mii_read(t, 1, 4) == 0x01E1
    assert model.counters.mii_writes == 4


def test_mii_configurable_phy_address():
    m = PegasusModel(phy_addr=3)
    t = ModelUsbTransport(m)
    assert mii_read(t, 1, 1) == 0xFFFF
    assert mii_read(t, 3, 1) == 0x782D
    t.close()


# --- MAC reset ------------------------------------------------------------------------------------
def test_mac_reset_self_clears_and_restores_defaults(t, model):
    enable(t, 0xCA, 0x30, 0x05)
    set_regs(t, 0x08, b"\xff" * 8)
    set_regs(t, 0x10, OTHER)
    set_reg(t, 0x01, 0x08)
    assert get_regs(t, 0x01, 1) == b"\x08"   # still resetting on the first read
    assert get_regs(t, 0x01, 1) == b"\x00"   # then clear
    assert get_regs(t, 0x00, 3) == b"\x00\x00\x00"
    assert get_regs(t, 0x08, 8) == bytes(8)
    assert get_regs(t, 0x10, 6) == OTHER     # EthID kept
    assert model.counters.mac_resets == 1


def test_mac_reset_read_count_is_configurable():
    m = PegasusModel(mac_reset_reads=3)
    t = ModelUsbTransport(m)
    set_reg(t, 0x01, 0x08)
    assert [get_regs(t, 0x01, 1)[0] for _ in range(4)] == [0x08, 0x08, 0x08, 0x00]
    t.close()


def test_adm8513_probe_register():
    t = ModelUsbTransport(PegasusModel())
    set_reg(t, 0x83, 0xA5)
    assert get_regs(t, 0x83, 1) != b"\xa5"   # default chip: trailer framing
    t8513 = ModelUsbTransport(PegasusModel(adm8513=True))
    set_reg(t8513, 0x83, 0xA5)
    assert get_regs(t8513, 0x83, 1) == b"\xa5"
    t.close()
    t8513.close()


# --- RX framing -------------------------------------------------------------------------------------
def test_rx_trailer_is_byte_exact(t, model):
    enable(t)
    f = frame(MAC, 60)
    assert model.wire_receive(f)
    c = rx(t)
    assert c.status is XferStatus.OK
    assert c.data == f + bytes([64, 0x00, 0x00, 0x00])          # 60 + 4 = 0x0040, status 0
    big = frame(MAC, 1514)
    assert model.wire_receive(big)
    assert rx(t).data == big + bytes([0xEE, 0x05, 0x00, 0x00])  # 1518 = 0x05EE
    bc = frame(b"\xff" * 6, 42 + 18)
    assert model.wire_receive(bc)
    assert rx(t).data[-4:] == bytes([64, 0x00, 0x01, 0x00])     # multicast/broadcast flag 0x01


def test_rx_includes_crc_when_asked(t, model):
    enable(t, ctrl0=0xC9)
    f = frame(MAC, 60)
    model.wire_receive(f)
    assert rx(t).data == f + zlib.crc32(f).to_bytes(4, "little") + bytes([64, 0, 0, 0])


def test_rx_adm8513_header_framing():
    m = PegasusModel(adm8513=True)
    t = ModelUsbTransport(m)
    enable(t)
    f = frame(MAC, 100)
    m.wire_receive(f)
    assert rx(t).data == bytes([100, 0]) + f + bytes([104, 0, 0, 0])
    t.close()


def test_rx_disabled_drops(t, model):
    assert not model.wire_receive(frame(MAC))
    assert model.counters.rx_dropped_disabled == 1
    rx_none(t)


# --- TX -------------------------------------------------------------------------------------------------
def test_tx_length_prefix(t, model):
    out = sent_frames(model)
    enable(t)
    f = frame(PEER, 60, src=MAC)
    assert tx(t, bytes([60, 0]) + f).status is XferStatus.OK
    f62 = frame(PEER, 62, src=MAC)          # 62 + 2 = 64: the padded len + 3 form
    tx(t, bytes([62, 0]) + f62 + b"\x00")
    assert out == [f, f62]
    assert model.counters.tx_frames == 2
    assert model.counters.tx_missing_pad == 0
    assert model.counters.tx_extra_bytes == 0
    tx(t, bytes([62, 0]) + f62)             # unpadded multiple of 64: sent, but counted
    assert model.counters.tx_missing_pad == 1
    assert len(out) == 3


def test_tx_malformed_dropped_and_counted(t, model):
    out = sent_frames(model)
    enable(t)
    f = frame(PEER, 60, src=MAC)
    tx(t, bytes([61, 0]) + f)               # prefix larger than the data
    tx(t, bytes([0, 0]) + f)                # zero
    tx(t, (1519).to_bytes(2, "little") + bytes(1519))  # too long
    tx(t, b"\x3c")                          # not even a prefix
    assert out == []
    assert model.counters.tx_malformed == 4
    assert model.counters.tx_frames == 0


def test_tx_needs_tx_enable(t, model):
    out = sent_frames(model)
    enable(t, ctrl0=0x48)                   # RX only
    tx(t, bytes([60, 0]) + frame(PEER, 60, src=MAC))
    assert out == []
    assert model.counters.tx_dropped_disabled == 1
    set_reg(t, 0x00, 0xC8)
    tx(t, bytes([60, 0]) + frame(PEER, 60, src=MAC))
    assert len(out) == 1


def test_tx_loopback(t, model):
    out = sent_frames(model)
    enable(t, ctrl2=0x09)
    f = frame(MAC, 60, src=MAC)
    tx(t, bytes([60, 0]) + f)
    assert out == []
    assert rx(t).data == f + bytes([64, 0, 0, 0])


def test_tx_without_carrier_reports_in_interrupt(t, model):
    out = sent_frames(model)
    enable(t)
    model.set_link(False)
    assert intr(t).data[5] == 0x00
    tx(t, bytes([60, 0]) + frame(PEER, 60, src=MAC))
    assert out == []
    pkt = intr(t).data
    assert pkt[0] == 0x10                   # no carrier


# --- filtering ----------------------------------------------------------------------------------------
def _ether_crc32_le(data: bytes) -> int:
    """Independent bitwise CRC32 (reflected 0xEDB88320, init ~0, no final inversion)."""
    crc = 0xFFFFFFFF
    for b in data:
        for _ in range(8):
            carry = (crc ^ b) & 1
            crc >>= 1
            b >>= 1
            if carry:
                crc ^= 0xEDB88320
    return crc


def test_filter_unicast_broadcast_multicast_promisc(t, model):
    enable(t)
    mcast = bytes.fromhex("01005e000001")
    assert model.wire_receive(frame(MAC))
    assert model.wire_receive(frame(b"\xff" * 6))
    assert not model.wire_receive(frame(OTHER))
    assert not model.wire_receive(frame(mcast))
    assert model.counters.rx_dropped_filter == 2
    set_reg(t, 0x00, 0xC8 | 0x02)           # all-multicast
    assert model.wire_receive(frame(mcast))
    assert not model.wire_receive(frame(OTHER))
    set_reg(t, 0x02, 0x01 | 0x04)           # promiscuous
    assert model.wire_receive(frame(OTHER))
    assert model.counters.rx_frames == 4
    assert [rx(t).data[:6] for _ in range(4)] == [MAC, b"\xff" * 6, mcast, OTHER]


def test_filter_follows_ethid(t, model):
    enable(t)
    set_regs(t, 0x10, OTHER)
    assert model.wire_receive(frame(OTHER))
    assert not model.wire_receive(frame(MAC))


def test_filter_multicast_hash(t, model):
    enable(t)
    wanted = bytes.fromhex("01005e7f0001")
    h = _ether_crc32_le(wanted) & 0x3F
    table = bytearray(8)
    table[h >> 3] |= 1 << (h & 7)
    set_regs(t, 0x08, table)
    others = [bytes.fromhex(f"01005e0000{i:02x}") for i in range(64)]
    miss = next(a for a in others if _ether_crc32_le(a) & 0x3F != h)
    assert model.wire_receive(frame(wanted))
    assert not model.wire_receive(frame(miss))


# --- RX overflow, interrupt packets ------------------------------------------------------------------
def test_rx_queue_overflow_counts_lost_and_reports_it():
    m = PegasusModel(rx_queue_limit=2)
    t = ModelUsbTransport(m)
    enable(t)
    results = [m.wire_receive(frame(MAC, fill=i)) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert m.counters.rx_lost == 3
    pkt = intr(t).data
    assert len(pkt) == 8
    assert ((pkt[3] & 0x7F) << 8 | pkt[4]) == 3
    assert pkt[2] & 0x01                    # overrun
    assert pkt[5] & 0x01                    # link up
    assert intr(t) is None                  # nothing new
    assert m.reg(0x2E) == m.reg(0x2F) == 0  # read-to-clear with EthCtrl2 bit 0
    t.cancel_all()
    t.close()


def test_interrupt_packet_on_link_change(t, model):
    assert intr(t) is None
    t.cancel_all()
    t.reap(0)
    model.set_link(False)
    assert intr(t).data == bytes(8)
    assert mii_read(t, 1, 1) & 0x0004 == 0
    assert mii_read(t, 1, 5) == 0
    model.set_link(True, speed=10, full_duplex=False)
    assert intr(t).data == bytes([0, 0, 0, 0, 0, 1, 0, 0])
    assert mii_read(t, 1, 1) & 0x0004
    assert mii_read(t, 1, 5) == 0x4021      # ACK + 10 half + CSMA
    model.set_link(True, speed=10, full_duplex=False)
    assert intr(t) is None                  # no change, no packet


def test_wire_receive_needs_link(t, model):
    enable(t)
    model.set_link(False)
    assert not model.wire_receive(frame(MAC))
    assert model.counters.rx_dropped_link == 1


# --- garbage -----------------------------------------------------------------------------------------
GARBAGE_FRAME = MAC + bytes.fromhex("02deadbeef01") + b"\x88\xb5" + bytes(range(46))


@pytest.mark.parametrize("kind, expected", [
    ("length_beyond_transfer", GARBAGE_FRAME + bytes([0xCC, 0x00, 0x00, 0x00])),  # 204 > 64
    ("zero_length", GARBAGE_FRAME + bytes([0x00, 0x00, 0x00, 0x00])),
    ("crc_error", GARBAGE_FRAME + bytes([64, 0x00, 0x08, 0x00])),
    ("runt", GARBAGE_FRAME[:20] + bytes([24, 0x00, 0x04, 0x00])),
    ("truncated", bytes([0x40, 0x00, 0x00])),
    ("oversize", GARBAGE_FRAME + bytes([0x44, 0x06, 0x00, 0x00])),               # 1604
    ("too_long", GARBAGE_FRAME + bytes([64, 0x00, 0x02, 0x00])),
    ("dribble", GARBAGE_FRAME + bytes([64, 0x00, 0x10, 0x00])),
    ("empty", b""),
])
def test_inject_rx_garbage(t, model, kind, expected):
    model.inject_rx_garbage(kind)           # queued even with RX disabled
    c = rx(t)
    assert c.status is XferStatus.OK
    assert c.data == expected
    assert model.counters.rx_garbage_injected == 1
    rx_none(t)


def test_inject_rx_garbage_unknown_kind(model):
    with pytest.raises(ValueError):
        model.inject_rx_garbage("bogus")


# --- faults ------------------------------------------------------------------------------------------
def test_stall_endpoint_until_clear_halt(t, model):
    enable(t)
    model.wire_receive(frame(MAC))
    model.stall_endpoint(0x81)
    assert rx(t).status is XferStatus.STALL
    assert model.rx_pending == 1            # the frame waits behind the halt
    t.clear_halt(0x81)
    assert rx(t).data[:6] == MAC
    model.stall_endpoint(0x02)
    out = sent_frames(model)
    assert tx(t, bytes([60, 0]) + frame(PEER, src=MAC)).status is XferStatus.STALL
    t.clear_halt(0x02)
    assert tx(t, bytes([60, 0]) + frame(PEER, src=MAC)).status is XferStatus.OK
    assert len(out) == 1
    setup, _ = model.request_log[-1]
    assert (setup.request_type, setup.request, setup.value, setup.index) == (0x02, 0x01, 0, 0x02)


def test_stall_next_control(t, model):
    model.stall_next_control(2)
    with pytest.raises(Stall):
        set_reg(t, 0x7E, 0x24)
    with pytest.raises(Stall):
        get_regs(t, 0x7E, 1)
    assert model.reg(0x7E) == 0             # a stalled request has no effect
    set_reg(t, 0x7E, 0x24)
    assert get_regs(t, 0x7E, 1) == b"\x24"


def test_no_answer_next_control(t, model):
    model.no_answer_next_control()
    with pytest.raises(TransferTimeout):
        set_reg(t, 0x7E, 0x24)
    assert model.reg(0x7E) == 0
    model.no_answer_next_control(execute=True)  # acted, but the answer was lost
    with pytest.raises(TransferTimeout):
        set_reg(t, 0x7E, 0x26)
    assert model.reg(0x7E) == 0x26
    assert model.counters.control_no_answer == 2


def test_hold_tx(t, model):
    """A device that stops accepting TX NAKs: the bulk OUT transfer stays pending (no
    timeout was asked for) until the device accepts data again."""
    out = sent_frames(model)
    enable(t)
    model.hold_tx(True)
    t.submit_out(0x02, bytes([60, 0]) + frame(PEER, src=MAC), 1)
    assert t.reap(0.01) == []
    assert t.in_flight() == 1 and out == []
    model.hold_tx(False)
    t.submit_out(0x02, bytes([60, 0]) + frame(PEER, src=MAC), 2)
    done = t.reap(0.01)
    assert [(c.tag, c.status) for c in done] == [(1, XferStatus.OK), (2, XferStatus.OK)]
    assert len(out) == 2
    assert model.counters.tx_held >= 1


def test_unplug_and_replug(t, model):
    enable(t)
    set_regs(t, 0x10, OTHER)
    t.submit_in(0x81, 1536, 7)
    model.unplug()
    with pytest.raises(DeviceGone):
        get_regs(t, 0x00, 1)
    done = t.reap(0)
    assert [(c.tag, c.status) for c in done] == [(7, XferStatus.NO_DEVICE)]
    assert not model.wire_receive(frame(MAC))
    model.replug()
    assert get_regs(t, 0x00, 3) == bytes(3)          # power-on state
    assert get_regs(t, 0x10, 6) == MAC               # EthID reloaded from the EEPROM


def test_notify_on_new_in_data(model):
    calls = []
    t = ModelUsbTransport(model)
    model.set_notify(lambda: calls.append(1))      # replaces the transport's wake-up
    enable(t)
    calls.clear()
    model.wire_receive(frame(MAC))
    assert calls == [1]
    model.wire_receive(frame(OTHER))                 # filtered: nothing new
    assert calls == [1]
    model.set_link(False)
    assert calls == [1, 1]
    t.close()


def test_request_log_is_capped():
    m = PegasusModel(request_log_limit=5)
    t = ModelUsbTransport(m)
    for i in range(12):
        set_reg(t, 0x7E, i)
    assert len(m.request_log) == 5
    assert [s.value for s, _ in m.request_log] == [7, 8, 9, 10, 11]
    assert m.counters.control_requests == 12
    t.close()
