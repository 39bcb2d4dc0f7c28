"""The CDC-ECM class driver against the ECM model (written from the spec, not from the driver):
class matching, bring-up requests, packet-filter bits, notifications -> link, framing, set_mac
emulation, checkpoint/restore and what recovery does with the ECM function's transfers (every
entry point and fault kind: tests/drivers/test_recovery_conformance.py)."""
from __future__ import annotations

import dataclasses
import time

import pytest

from udrv.datapath import Capabilities
from udrv.driver import RxMode
from udrv.drivers.cdc_ecm import CdcEcm, NotCdcEcm, parse_ecm_function
from udrv.errors import UdrvError
from udrv.models.usb import ModelUsbTransport
from udrv.models.cdc_ecm import EcmModel
from udrv.models.pegasus import PegasusModel
from udrv.nic import Nic, NicOptions
from udrv.usbtransport import EndpointInfo, EpType, InterfaceInfo

from rigs import Rig

PEER = bytes.fromhex("02aabbccdd01")
NEW_MAC = bytes.fromhex("02c0ffee0001")
MCAST = (bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"))

# the spec's numbers, for assertions (written out, not imported from the driver)
SET_ETHERNET_MULTICAST_FILTERS, SET_ETHERNET_PACKET_FILTER, SET_INTERFACE = 0x40, 0x43, 0x0B
PROMISC, ALL_MULTI, DIRECTED, BROADCAST, MULTICAST = 0x01, 0x02, 0x04, 0x08, 0x10


def frame(dst: bytes, n: int, size: int = 60, src: bytes = PEER) -> bytes:
    body = n.to_bytes(4, "big") + bytes((n + i) & 0xFF for i in range(size - 18))
    return dst + src + b"\x88\xb5" + body


class EcmRig(Rig):
    def __init__(self, model: EcmModel | None = None, watchdog=None, cls: type = CdcEcm, **opts):
        super().__init__(watchdog, model=model or EcmModel(), driver=cls, **opts)

    def up(self) -> "EcmRig":
        super().up()
        self.pump()
        return self

    @property
    def driver(self) -> CdcEcm:
        return self.nic.driver


@pytest.fixture
def rig():
    r = EcmRig().up()
    yield r
    r.nic.close()


@pytest.fixture
def wrig(watchdog):
    r = EcmRig(watchdog=watchdog, config_deadline=0.15, datapath_deadline=0.15).up()
    yield r
    r.nic.close()


# --- matching and descriptors -------------------------------------------------------------------

def test_matches_by_class_not_by_id():
    assert CdcEcm.match_device(EcmModel(vid=0x1234, pid=0x5678).info)
    assert not CdcEcm.match_device(PegasusModel().info)
    assert CdcEcm.match(0x1D6B, 0x0103) is None          # no id table: a class driver


def test_descriptors_give_endpoints_mac_index_mtu_and_filters():
    fn = parse_ecm_function(EcmModel(max_segment=1514, mc_filters=0x8010).info)
    assert (fn.control, fn.data, fn.data_alt) == (0, 1, 1)
    assert (fn.ep_in, fn.ep_out, fn.ep_status) == (0x81, 0x02, 0x83)
    assert (fn.mac_string, fn.max_segment, fn.mc_filters, fn.mc_imperfect) == (3, 1514, 16, True)


def test_qemu_like_device_with_an_rndis_configuration_first():
    """QEMU usb-net lists an RNDIS configuration (data alt 0 has endpoints) before the ECM one."""
    ecm = EcmModel().info
    rndis_ctl = InterfaceInfo(0, 0, 0x02, 0x02, 0xFF, (EndpointInfo(0x81, EpType.INTERRUPT, 16),),
                              bytes((5, 0x24, 0x06, 0, 1)))
    rndis_data = InterfaceInfo(1, 0, 0x0A, 0, 0, (EndpointInfo(0x82, EpType.BULK, 64),
                                                  EndpointInfo(0x02, EpType.BULK, 64)))
    info = dataclasses.replace(ecm, interfaces=(rndis_ctl, rndis_data) + ecm.interfaces)
    fn = parse_ecm_function(info)
    assert fn.data_alt == 1 and fn.ep_in == 0x81


@pytest.mark.parametrize("extra,why", [
    (bytes((5, 0x24, 0x00, 0x10, 0x01)), "no Union"),
    (bytes((5, 0x24, 0x06, 0, 1)), "no Ethernet Networking"),
    (bytes((0, 0x24, 0x06)), "no Union"),                   # malformed length: parsing stops
])
def test_missing_functional_descriptors_are_named(extra, why):
    info = EcmModel().info
    ctl = dataclasses.replace(info.interfaces[0], extra=extra)
    info = dataclasses.replace(info, interfaces=(ctl,) + info.interfaces[1:])
    with pytest.raises(NotCdcEcm, match=why):
        parse_ecm_function(info)
    assert not CdcEcm.match_device(info)


def test_the_registry_picks_the_class_driver_for_an_unknown_id():
    from udrv.registry import usb_driver_for
    info = EcmModel(vid=0x1234, pid=0x5678).info
    assert usb_driver_for(info).name == "cdc_ecm"


# --- bring-up --------------------------------------------------------------------------------------

def test_bring_up_requests(rig):
    m = rig.model
    assert rig.transport.claimed == {0, 1}
    assert rig.nic.mac == m.mac
    alts = [(s.index, s.value) for s, _ in m.requests(SET_INTERFACE)]
    assert alts == [(1, 0), (1, 0), (1, 1)]               # probe quiesces; open resets then starts
    pf = m.requests(SET_ETHERNET_PACKET_FILTER)
    assert pf and all(s.request_type == 0x21 and s.index == 0 and s.length == 0 for s, _ in pf)
    assert m.packet_filter == DIRECTED | BROADCAST
    assert m.data_alt == 1
    assert rig.driver.max_mtu == 1500 and rig.nic.driver.soft.mtu == 1500


def test_mtu_follows_wmaxsegmentsize():
    r = EcmRig(EcmModel(max_segment=1014)).up()
    assert r.driver.max_mtu == 1000 and r.driver.soft.mtu == 1000
    with pytest.raises(UdrvError):
        r.nic.set_mtu(1500)
    r.nic.set_mtu(900)
    assert r.driver.soft.mtu == 900


def test_stop_selects_alt_0_and_open_starts_again(rig):
    rig.nic.configure("stop")
    assert rig.model.data_alt == 0
    rig.nic.open()
    assert rig.model.data_alt == 1
    rig.send([frame(PEER, 1)])
    assert rig.wire_tx == [frame(PEER, 1)]


def test_bad_mac_string_is_refused_with_a_reason():
    m = EcmModel()
    m.strings[3] = "not-a-mac"
    r = EcmRig(m)
    with pytest.raises(UdrvError, match="iMACAddress"):
        r.nic.bring_up()


def test_device_without_packet_filter_still_works():
    r = EcmRig(EcmModel(support_packet_filter=False)).up()
    assert r.driver.soft.filter_supported is False
    r.nic.set_rx_mode(RxMode(promisc=True))               # host-side only, no request, no fault
    assert r.nic.recoveries == []
    r.send([frame(PEER, 1)])
    assert r.wire_tx == [frame(PEER, 1)]


# --- packet filter bits ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,bits", [
    (RxMode(), DIRECTED | BROADCAST),
    (RxMode(promisc=True), DIRECTED | BROADCAST | PROMISC),
    (RxMode(allmulti=True), DIRECTED | BROADCAST | ALL_MULTI),
    (RxMode(multicast=MCAST), DIRECTED | BROADCAST | ALL_MULTI),   # no device filters: all-multicast
])
def test_packet_filter_bits(rig, mode, bits):
    rig.nic.set_rx_mode(mode)
    assert rig.model.packet_filter == bits
    assert rig.model.requests(SET_ETHERNET_MULTICAST_FILTERS) == []


def test_multicast_filters_when_the_device_has_them():
    r = EcmRig(EcmModel(mc_filters=4)).up()
    r.nic.set_rx_mode(RxMode(multicast=MCAST))
    assert r.model.packet_filter == DIRECTED | BROADCAST | MULTICAST
    assert set(r.model.multicast) == set(MCAST)
    (s, data), = r.model.requests(SET_ETHERNET_MULTICAST_FILTERS)
    assert s.request_type == 0x21 and s.value == 2 and len(data) == 12
    # more groups than filters: all-multicast instead
    many = tuple(bytes.fromhex(f"01005e0000{i:02x}") for i in range(5))
    r.nic.set_rx_mode(RxMode(multicast=many))
    assert r.model.packet_filter == DIRECTED | BROADCAST | ALL_MULTI
    # and the filters really filter, in the model
    r.nic.set_rx_mode(RxMode(multicast=MCAST))
    r.model.wire_receive(frame(MCAST[0], 1))
    r.model.wire_receive(frame(bytes.fromhex("01005e0000ff"), 2))
    r.pump()
    assert r.host_rx == [frame(MCAST[0], 1)]


def test_set_mac_is_emulated_with_promiscuous(rig):
    rig.nic.set_mac(NEW_MAC)
    assert rig.nic.mac == NEW_MAC
    assert rig.model.packet_filter & PROMISC
    rig.model.wire_receive(frame(NEW_MAC, 1))
    rig.pump()
    assert rig.host_rx == [frame(NEW_MAC, 1)]
    rig.nic.set_mac(rig.model.mac)                      # back to the device's own: directed again
    assert rig.model.packet_filter == DIRECTED | BROADCAST
    assert rig.driver.stats().extra["mac_emulated"] == 0


# --- notifications ----------------------------------------------------------------------------------

def test_notifications_drive_the_link(rig):
    assert rig.nic.link_check().up and rig.nic.link.speed == 425
    rig.model.set_link(False)
    rig.pump()
    assert rig.nic.link_check().up is False
    rig.model.set_link(True, bitrate=100_000_000)
    rig.pump()
    link = rig.nic.link_check()
    assert link.up and link.speed == 100
    assert rig.driver.stats().extra["link_changes"] == 2


def test_speed_change_split_over_two_8_byte_packets():
    r = EcmRig(EcmModel(notify_packet=8, bitrate=12_000_000)).up()
    assert r.driver.status_size == 8
    assert r.nic.link_check().speed == 12
    r.model.set_link(True, bitrate=480_000_000)
    r.pump()
    assert r.nic.link_check().speed == 480
    assert r.driver.stats().extra["bad_notifications"] == 0


def test_malformed_notifications_are_counted(rig):
    rig.model.notify_raw(b"\x01\x02")
    rig.model.notify_raw(bytes((0x21, 0, 1, 0, 0, 0, 0, 0)))
    rig.pump()
    assert rig.driver.stats().extra["bad_notifications"] == 2
    assert rig.nic.recoveries == []


# --- framing ------------------------------------------------------------------------------------------

def test_raw_frames_both_ways(rig):
    out = [frame(PEER, i, size=60 + i * 7) for i in range(30)]
    rig.send(out)
    assert rig.wire_tx == out
    for i in range(10):
        rig.model.wire_receive(frame(rig.nic.mac, i, 100))
    rig.model.wire_receive(frame(b"\xff" * 6, 99))
    rig.model.wire_receive(frame(bytes.fromhex("02deadbeef00"), 98))   # someone else's: filtered
    rig.pump()
    assert rig.host_rx == [frame(rig.nic.mac, i, 100) for i in range(10)] + [frame(b"\xff" * 6, 99)]


@pytest.mark.parametrize("speed,mps", [("high", 512), ("full", 64)])
def test_pad_byte_at_the_packet_boundary(speed, mps):
    r = EcmRig(EcmModel(speed=speed)).up()
    exact = frame(PEER, 1, size=mps * 2)
    r.send([exact, frame(PEER, 2)])
    assert r.wire_tx[0][:len(exact)] == exact and len(r.wire_tx[0]) == len(exact) + 1
    assert r.wire_tx[1] == frame(PEER, 2)               # not merged with the one before
    assert r.model.counters.tx_pad_bytes == 1


@pytest.mark.parametrize("data,reason", [(b"", "zero_length"), (b"\x00" * 10, "runt"),
                                         (b"\x00" * 1519, "oversize")])
def test_bad_rx_transfers_are_counted_by_reason(rig, data, reason):
    rig.model.inject_rx_raw(data)
    rig.model.wire_receive(frame(rig.nic.mac, 1))
    rig.pump()
    assert rig.host_rx == [frame(rig.nic.mac, 1)]
    assert rig.nic.engine.counters.rx_dropped == {reason: 1}
    assert rig.nic.recoveries == []


# --- checkpoint / restore and recovery ------------------------------------------------------------------

def device_config(m: EcmModel) -> tuple:
    return m.packet_filter, m.multicast, m.data_alt


def test_restore_rebuilds_the_device_after_a_function_reset():
    r = EcmRig(EcmModel(mc_filters=4)).up()
    r.nic.set_rx_mode(RxMode(multicast=MCAST))
    before = device_config(r.model)
    cp = r.driver.checkpoint()
    r.model.function_reset()
    assert device_config(r.model) != before
    r.driver.restore(cp)
    assert device_config(r.model) == before


def test_unplug_and_replug(wrig):
    wrig.model.unplug()
    wrig.pump()
    assert wrig.nic.state == "down"
    wrig.model.replug()
    wrig.nic.restart()
    assert wrig.nic.state == "up" and wrig.model.data_alt == 1
    wrig.send([frame(PEER, 3)])
    assert wrig.wire_tx == [frame(PEER, 3)]


# --- TX offloads in software: what the C ring leaves in the journal, sent by the Python engine --------------

def tso_entry(n_payload: int, mss: int = 1448, seq: int = 7000):
    from frames import gso_tcp, payload_bytes
    return gso_tcp(payload_bytes(n_payload, salt=n_payload), mss=mss, seq=seq)


def test_the_c_ring_variant_declares_software_tx_offloads_the_python_engine_none():
    from udrv.drivers.pegasus import Pegasus
    for cls in (CdcEcm, Pegasus):
        assert cls.c_variant().offloads == {"csum", "tso4", "tso6"}
        assert not getattr(cls, "offloads", frozenset())


@pytest.fixture
def trig(watchdog):
    """The Python engine where the C ring's variant ran before (its journal, 64 KiB slots)."""
    from udrv.usbnet import SOFTWARE_TX_OFFLOADS
    cls = type("CdcEcmAfterSwap", (CdcEcm,), {"offloads": SOFTWARE_TX_OFFLOADS})
    r = EcmRig(watchdog=watchdog, cls=cls, config_deadline=0.15, datapath_deadline=0.15).up()
    yield r
    r.nic.close()


def test_a_tso_entry_left_by_the_c_ring_goes_out_as_wire_frames_from_the_python_engine(trig):
    from udrv import offload
    rig = trig
    h, f = tso_entry(20000)
    want = offload.resolve(h, f)
    assert len(want) == 14
    rig.nic.journal.append(f, h.pack())
    rig.nic.journal.append(frame(PEER, 1))
    rig.pump()
    assert rig.wire_tx == want + [frame(PEER, 1)]        # cut in order, the plain frame after it
    assert rig.nic.journal.unconfirmed() == 0
    assert rig.nic.engine.counters.tx_packets == 15      # wire frames, not journal entries


@pytest.mark.parametrize("kind", ["raise", "stall"])
def test_a_fault_in_the_middle_of_a_tso_entry_re_sends_it_whole(trig, kind):
    from udrv import offload
    wrig = trig
    h, f = tso_entry(30000)
    want = offload.resolve(h, f)
    engine = wrig.nic.engine
    engine.n_tx = 4                                      # the entry cannot go out in one xmit
    wrig.nic.journal.append(f, h.pack())
    wrig.nic.xmit()
    assert engine._pieces and wrig.nic.journal.unsent() == 1    # not "sent" until its last piece is
    wrig.nic.inject("poll", kind)
    wrig.pump(60)
    assert wrig.nic.journal.unconfirmed() == 0
    assert wrig.nic.recoveries and wrig.nic.recoveries[-1].outcome == "recovered"
    assert wrig.wire_tx[-len(want):] == want              # the whole entry after the recovery
    assert set(want) <= set(wrig.wire_tx)


# --- RX coalescing opt-in: a TAP with a virtio-net header but no offloads (root) ---------------------------

def test_the_c_ring_variant_asks_for_a_vnet_header_only_where_the_driver_opts_in():
    from udrv.drivers.pegasus import Pegasus
    assert CdcEcm.c_variant().rx_vnet_hdr is True and Pegasus.c_variant().rx_vnet_hdr is True
    assert type("NoCoalescing", (Pegasus,), {"coalesce_rx": False}).c_variant().rx_vnet_hdr is False
    assert not getattr(CdcEcm, "rx_vnet_hdr", False)     # the Python engine has nothing to coalesce


@pytest.mark.root
def test_real_tap_vnet_header_without_offloads_carries_frames_both_ways():
    """What the C ring's variant gets (rx_vnet_hdr): IFF_VNET_HDR on, no TX offload asked, so the
    kernel hands over finished frames behind a zeroed header; both directions stay byte-exact
    (here through the Python engine: the header is added on write and stripped on read)."""
    import os
    import socket
    from udrv.tap import IFF_VNET_HDR, Tap
    tap = Tap(f"udrve{os.getpid() % 100000}")
    model = EcmModel()
    wire_tx: list[bytes] = []
    model.on_transmit = wire_tx.append
    cls = type("CdcEcmVnet", (CdcEcm,), {"rx_vnet_hdr": True})
    nic = Nic(cls, ModelUsbTransport(model), tap.write, NicOptions(n_rx=8, n_tx=16))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        assert tap.tun_flags() & IFF_VNET_HDR and tap.vnet_hdr_len == 12 and nic.vnet_hdr_len == 12
        assert tap.offloads == frozenset()
        nic.bring_up()
        tap.set_mac(nic.mac)
        tap.set_up(True)
        nic.open()
        sock.bind((tap.name, 0))
        sock.settimeout(2)
        inbound = [frame(nic.mac, n, size) for n, size in enumerate((60, 512, 1514))]
        for f in inbound:
            assert model.wire_receive(f)
        for _ in range(20):
            nic.poll(0.0)
        got = []
        while len(got) < len(inbound):
            data = sock.recv(4096)
            if data[12:14] == b"\x88\xb5":
                got.append(data)
        assert got == inbound
        outbound = [frame(PEER, 100 + n, size, src=nic.mac) for n, size in enumerate((60, 1514))]
        for f in outbound:
            sock.send(f)
        for _ in range(50):
            nic.enqueue(tap.read_batch(16, None))
            nic.xmit()
            nic.poll(0.0)
            if len([f for f in wire_tx if f[12:14] == b"\x88\xb5"]) >= len(outbound):
                break
        assert [f for f in wire_tx if f[12:14] == b"\x88\xb5"] == outbound
    finally:
        sock.close()
        nic.close()
        tap.close()


def test_restore_skips_the_ecm_reset_when_the_device_is_in_the_checkpoints_alt():
    r = EcmRig(EcmModel(mc_filters=4)).up()
    r.nic.set_rx_mode(RxMode(multicast=MCAST))
    before = device_config(r.model)
    cp = r.driver.checkpoint()
    resets = r.model.counters.set_interface
    r.model.packet_filter = 0                      # something the device lost; its alt is intact
    r.driver.restore(cp)
    assert device_config(r.model) == before
    assert r.model.counters.set_interface == resets   # asked (GET_INTERFACE), no SET_INTERFACE
    r.model._set_interface(r.model.DATA, 0)        # now the alt is wrong: the full ECM reset
    resets = r.model.counters.set_interface
    r.driver.restore(cp)
    assert device_config(r.model) == before and r.model.counters.set_interface == resets + 2   # 0, then 1


def test_restore_resets_a_device_that_will_not_say_its_alt():
    r = EcmRig(EcmModel(mc_filters=4)).up()
    cp = r.driver.checkpoint()
    resets = r.model.counters.set_interface
    r.model._stall_control = 1                     # GET_INTERFACE stalls
    r.driver.restore(cp)
    assert r.model.counters.set_interface == resets + 2 and r.model.data_alt == 1   # alt 0, then 1


# --- keeping transfers in flight across a recovery -------------------------------------------------

class KeepingEngine:
    """The Python engine behind the C ring's extra entry point (resume: keep the transfers when
    nothing reset the device's endpoints since they went out), recording what Nic asked of it.
    The engine's own state is whole here because the fault fires at the call's exit."""
    caps = Capabilities(keeps_in_flight=True)

    def __init__(self, engine, usb):
        self._engine, self._usb = engine, usb
        self.epoch = usb.endpoint_resets
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def resume(self) -> bool:
        self.calls.append("resume")
        return self._usb.endpoint_resets == self.epoch

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        self.calls.append("recycle" if clear_halts else "recycle, halts left alone")
        done = self._engine.recycle(clear_halts)
        self.epoch = self._usb.endpoint_resets
        return done


@pytest.fixture
def krig(watchdog):
    r = EcmRig(watchdog=watchdog, config_deadline=0.15, datapath_deadline=0.15).up()
    r.nic.domain.engine = KeepingEngine(r.nic.engine, r.transport)     # the domain's recovery asks its engine
    yield r
    r.nic.close()


def _inject_at_exit(r, entry: str, kind: str) -> None:
    # no device operation inside the call: the fault fires as the call returns, engine state whole
    r.nic.inject(entry, kind)
    r.nic.xmit() if entry == "xmit" else r.nic.poll(0.0)


def test_a_write_to_the_device_since_the_checkpoint_means_a_driver_side_fault_is_restored(wrig):
    wrig.nic.set_rx_mode(RxMode(allmulti=True))
    before = wrig.transport.device_writes
    # a driver that, outside any configuration call, told the device to take promiscuous frames
    wrig.transport.control_out(0x21, 0x43, PROMISC | DIRECTED | BROADCAST, 0, b"", 1.0)
    assert wrig.transport.device_writes == before + 1
    assert wrig.model.packet_filter == PROMISC | DIRECTED | BROADCAST
    wrig.nic.inject("xmit", "raise")
    wrig.send([frame(PEER, 1)])
    rec = wrig.nic.recoveries[-1]
    assert rec.entry == "xmit" and rec.device_restored and not rec.device_untouched
    assert wrig.model.packet_filter == DIRECTED | BROADCAST | ALL_MULTI     # the checkpoint's filter
    # restored, the device is the checkpoint's again: the next fault of the driver's own skips it
    writes, requests = wrig.transport.device_writes, wrig.model.counters.class_requests
    wrig.nic.inject("xmit", "raise")
    wrig.send([frame(PEER, 2)])
    rec = wrig.nic.recoveries[-1]
    assert rec.device_untouched and not rec.device_restored
    assert wrig.transport.device_writes == writes and wrig.model.counters.class_requests == requests
    assert wrig.wire_tx[-1] == frame(PEER, 2)


def test_a_tx_hang_restores_what_the_device_lost_behind_the_hosts_back(watchdog):
    r = EcmRig(watchdog=watchdog, tx_timeout=0.05).up()
    r.nic.set_rx_mode(RxMode(allmulti=True))
    r.model.hold_tx(True)
    frames = [frame(PEER, i) for i in range(8)]
    r.send(frames)
    r.model.function_reset()          # a firmware hiccup: filters at defaults, data interface idle
    assert r.model.data_alt == 0 and r.model.packet_filter != DIRECTED | BROADCAST | ALL_MULTI
    r.nic.check_tx_progress()
    time.sleep(0.08)
    assert not r.nic.check_tx_progress()
    rec = r.nic.recoveries[-1]
    assert rec.fault == "tx_timeout" and rec.outcome == "recovered" and rec.device_restored
    assert r.model.data_alt == 1 and r.model.packet_filter == DIRECTED | BROADCAST | ALL_MULTI
    r.model.hold_tx(False)
    r.pump(50)
    assert set(frames) <= set(r.wire_tx) and r.nic.journal.unconfirmed() == 0
    r.nic.close()


def test_a_fault_of_the_drivers_own_keeps_the_transfers_in_flight(krig):
    krig.send([frame(PEER, i) for i in range(5)])
    in_flight = krig.transport.in_flight()
    assert in_flight >= krig.nic.engine.n_rx
    _inject_at_exit(krig, "xmit", "raise")
    rec = krig.nic.recoveries[-1]
    assert rec.outcome == "recovered" and rec.device_untouched and rec.fault == "exception"
    assert krig.nic.engine.calls == ["resume"] and rec.rolled_back == ["in-flight transfers kept"]
    assert krig.transport.in_flight() == in_flight          # nothing cancelled, nothing resubmitted
    krig.send([frame(PEER, 10)])
    krig.model.wire_receive(frame(krig.nic.mac, 11))
    krig.pump()
    assert krig.wire_tx[-1] == frame(PEER, 10) and krig.host_rx[-1] == frame(krig.nic.mac, 11)


@pytest.mark.parametrize("kind, fault, call, clears", [("stall", "stall", "recycle", 2),
                                                       ("timeout", "device_timeout", "recycle, halts left alone", 0)])
def test_a_fault_the_device_reported_recycles_the_transfers(krig, kind, fault, call, clears):
    halts = krig.model.counters.clear_halts
    _inject_at_exit(krig, "poll", kind)
    rec = krig.nic.recoveries[-1]
    assert rec.fault == fault and rec.outcome == "recovered"
    assert krig.nic.engine.calls == [call] and rec.rolled_back == ["in-flight transfers recycled"]
    assert krig.model.counters.clear_halts - halts == clears     # CLEAR_FEATURE(HALT) on IN and OUT
    krig.model.wire_receive(frame(krig.nic.mac, 13))
    krig.pump()
    assert krig.host_rx[-1] == frame(krig.nic.mac, 13)


def test_a_restore_that_reset_the_endpoints_recycles_the_transfers(krig):
    # the driver (outside any configuration call) put the data interface in alt 0: a write since
    # the checkpoint, so the restore runs, re-selects alt 1, and that resets the endpoints
    krig.transport.set_alt_setting(krig.model.DATA, 0)
    _inject_at_exit(krig, "xmit", "raise")
    rec = krig.nic.recoveries[-1]
    assert krig.model.data_alt == 1 and rec.outcome == "recovered"
    assert krig.nic.engine.calls == ["resume", "recycle"] and rec.rolled_back == ["in-flight transfers recycled"]
    krig.model.wire_receive(frame(krig.nic.mac, 12))
    krig.pump()
    assert krig.host_rx[-1] == frame(krig.nic.mac, 12)


def test_endpoint_resets_count_what_flushes_endpoint_queues():
    t = ModelUsbTransport(EcmModel())
    t.control_out(0x21, SET_ETHERNET_PACKET_FILTER, DIRECTED, 0, b"", 1.0)   # class request: no
    assert t.endpoint_resets == 0
    t.set_alt_setting(1, 1)
    t.clear_halt(0x81)
    t.control_out(0x01, SET_INTERFACE, 1, 1, b"", 1.0)     # the same request, sent raw
    assert t.endpoint_resets == 3


def test_status_shows_the_tx_queue_in_front_of_the_device(trig):
    rig = trig
    h, f = tso_entry(20000)
    rig.nic.journal.append(f, h.pack())                  # one TSO entry: its frame bytes count, not its header
    rig.nic.journal.append(frame(PEER, 1))
    j = rig.nic.status()["tx_journal"]
    assert j.pop("oldest_waiting_ms") > 0                 # the TSO entry, since it was journaled
    assert j == {"unconfirmed": 2, "in_device": 0, "queued": 2, "queued_bytes": len(f) + 60, "reissued": 0,
                 "aqm_target_ms": 5.0, "aqm_interval_ms": 100.0, "aqm_ecn": True, "aqm_drops": 0, "aqm_marks": 0}
    rig.pump()
    j = rig.nic.status()["tx_journal"]
    assert (j["queued"], j["queued_bytes"], j["unconfirmed"]) == (0, 0, 0)
