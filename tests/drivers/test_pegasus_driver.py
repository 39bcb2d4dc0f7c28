"""The pegasus driver against the pegasus model (written independently from the same facts)."""
import pytest

from rigs import PEER_MAC, Rig, frame_to
from udrv.driver import RxMode
from udrv.drivers.pegasus import PEGASUS_IDS, Pegasus
from udrv.errors import UdrvError


def writes(model):
    """(register, value) of every single-register write, in order."""
    out = []
    for s, data in model.request_log:
        if s.request_type == 0x40 and s.request == 0xF1:
            if s.length == 1:
                out.append((s.index, s.value))
            else:
                out.extend((s.index + i, b) for i, b in enumerate(data))
    return out


def test_bringup_register_sequence():
    r = Rig()
    r.nic.bring_up()
    w = writes(r.model)
    # MAC reset first, then GPIO setup, then the Pegasus II setup, in the Linux driver's order
    assert w[0] == (0x01, 0x08)
    expected = [(0x7F, 0x26), (0x7E, 0x24), (0x7E, 0x26), (0x1D, 0x00), (0x7B, 0x01), (0x7B, 0x02),
                (0x83, 0xA5), (0x80, 0xC0), (0x83, 0xFF), (0x84, 0x01), (0x81, 0x02)]
    it = iter(w)
    for e in expected:
        assert e in it, f"missing or out of order: {e}"
    assert r.model.counters.mac_resets == 1
    assert r.model.counters.set_one_data_mismatch == 0
    assert r.nic.mac == r.model.mac
    assert r.nic.driver.soft.phy == 1
    assert r.nic.driver.soft.intr_interval == 8           # EEPROM word 4, high byte
    assert not r.nic.driver.soft.adm8513                  # 0x83 did not read back 0xA5


def test_open_programs_ethctrl_from_link_partner():
    r = Rig().up()
    # 100 Mbit/s full duplex partner: TX+RX enable, status append; full duplex + 100; normal
    assert bytes(r.model.regs[0:3]) == bytes((0xC8, 0x30, 0x01))
    r.nic.close()


def test_open_half_duplex_10():
    r = Rig()
    r.model.set_link(True, speed=10, full_duplex=False)
    r.up()
    assert bytes(r.model.regs[0:3]) == bytes((0xC8, 0x00, 0x01))
    assert r.nic.link_check().speed == 10


def test_tx_frames_reach_the_wire_byte_exact(rig):
    frames = [frame_to(b"\xff" * 6, i, 60 + i * 37 % 1400) for i in range(40)]
    rig.send(frames)
    assert rig.wire_tx == frames
    assert rig.model.counters.tx_malformed == 0
    assert rig.model.counters.tx_missing_pad == 0 and rig.model.counters.tx_extra_bytes == 0
    assert rig.nic.engine.counters.tx_packets == 40
    assert rig.nic.journal.unconfirmed() == 0


def test_tx_64_byte_boundary_frames(rig):
    frames = [frame_to(PEER_MAC, i, n - 14) for i, n in enumerate((62, 126, 190, 510, 1022))]
    rig.send(frames)
    assert rig.wire_tx == frames
    assert rig.model.counters.tx_missing_pad == 0


def test_rx_unicast_broadcast_and_filtering(rig):
    mine = frame_to(rig.nic.mac, 1)
    bcast = frame_to(b"\xff" * 6, 2)
    other = frame_to(bytes.fromhex("020000000099"), 3)
    for f in (mine, bcast, other):
        rig.model.wire_receive(f)
    rig.pump()
    assert rig.host_rx == [mine, bcast]


def test_promiscuous_and_allmulti(rig):
    other = frame_to(bytes.fromhex("020000000099"), 3)
    mcast = frame_to(bytes.fromhex("01005e000001"), 4)
    rig.nic.set_rx_mode(RxMode(promisc=True))
    assert rig.model.reg(0x02) & 0x04
    rig.model.wire_receive(other)
    rig.pump()
    assert rig.host_rx == [other]
    rig.nic.set_rx_mode(RxMode(allmulti=True))
    assert not rig.model.reg(0x02) & 0x04 and rig.model.reg(0x00) & 0x02
    rig.model.wire_receive(other)
    rig.model.wire_receive(mcast)
    rig.pump()
    assert rig.host_rx == [other, mcast]


def test_set_mac(rig):
    new = bytes.fromhex("020102030405")
    rig.nic.set_mac(new)
    assert rig.model.regs[0x10:0x16] == new
    rig.model.wire_receive(frame_to(new, 9))
    rig.pump()
    assert len(rig.host_rx) == 1


def test_mtu_limits(rig):
    rig.nic.set_mtu(1400)
    assert rig.nic.driver.soft.mtu == 1400
    with pytest.raises((UdrvError, ValueError)):
        rig.nic.set_mtu(1501)
    assert rig.nic.driver.soft.mtu == 1400      # the refused MTU changed nothing
    rig.nic.enqueue([frame_to(PEER_MAC, 1, 1450)])
    assert rig.nic.counters.tx_dropped == {"oversize": 1}


def test_link_down_and_up(rig):
    assert rig.nic.link_check().up
    rig.model.set_link(False)
    assert not rig.nic.link_check().up
    rig.model.set_link(True, speed=100, full_duplex=True)
    link = rig.nic.link_check()
    assert link.up and link.speed == 100 and link.full_duplex


def test_interrupt_packet_lost_rx_count(rig):
    # fill the model's RX queue beyond its limit with RX not harvested: it counts lost frames
    rig.model.rx_queue_limit = 4
    for i in range(10):
        rig.model.wire_receive(frame_to(rig.nic.mac, i))
    rig.pump()
    assert rig.model.counters.rx_lost == 6
    assert rig.nic.driver.stats().rx_missed == 6


def test_id_table_keeps_linux_quirks():
    assert len(PEGASUS_IDS) > 70
    assert Pegasus.match(0x07A6, 0x8515) is not None
    assert Pegasus.match(0x050D, 0x0121, device_class=0) is not None
    assert Pegasus.match(0x050D, 0x0121, device_class=0xE0) is None   # the Belkin Bluetooth dongle
    assert Pegasus.match(0x1234, 0x5678) is None
