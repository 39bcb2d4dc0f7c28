"""The pegasus gadget's C data path (native/rigs/pegpump.c via udrv.testbed.pegasus_pump) follows the
model's rules, byte for byte, without a kernel tier: the bulk endpoint files are pipes (AIO on
a pipe completes at once) and the wire is a SOCK_SEQPACKET pair (one message per frame, like
a TAP). A twin PegasusModel, configured with the same control requests, says what the device
must produce; the pump's transfers and its folded counters are compared with it.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from udrv.testbed import pegasus_pump, rigs
from udrv.testbed.ffs import FfsCounters
from udrv.models.pegasus import (CTL0_INCLUDE_CRC, EP_RX, EP_TX, EthCtrl0, EthCtrl1, EthCtrl2, MulticastHash,
                                 PegasusModel, _hash_bit)
from udrv.models.usb import Setup

pytestmark = pytest.mark.skipif(not pegasus_pump.available(), reason=rigs.why_unavailable())

MAC = bytes.fromhex("02a685150001")
PEER = bytes.fromhex("02deadbeef02")
WAIT = 3.0


def set_reg(model: PegasusModel, reg: int, value: int) -> None:
    model.control(Setup(0x40, 0xF1, value, reg, 1), bytes([value]))


def frame(dst: bytes, n: int = 60, fill: int = 0x5A) -> bytes:
    return dst + PEER + b"\x88\xb5" + bytes([fill]) * (n - 14)


def until(pred, what: str):
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"{what} did not happen within {WAIT} s")


class PipeRig:
    """model + pump on pipes; `twin` is configured alike and answers what the device should do."""

    def __init__(self) -> None:
        self.model, self.twin = PegasusModel(mac=MAC), PegasusModel(mac=MAC)
        self.in_r, self.in_w = os.pipe2(os.O_NONBLOCK)     # EP 0x81: the pump's transfers
        self.out_r, self.out_w = os.pipe2(os.O_NONBLOCK)   # EP 0x02: the "host" writes here
        self.wire, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.settimeout(WAIT)
        self.ffs = FfsCounters()
        self.pump = pegasus_pump.PegasusPump(self.model, self.wire.fileno(), in_depth=4, out_depth=2, nice=0)
        self.pump.attach({EP_RX: self.in_w, EP_TX: self.out_r}, self.ffs, lambda: None)
        self.pump.set_enabled(True, {EP_RX: 512})
        for reg, value in ((EthCtrl0, 0xC8), (EthCtrl1, 0x30), (EthCtrl2, 0x01)):
            self.both(reg, value)

    def both(self, reg: int, value: int) -> None:
        for m in (self.model, self.twin):
            set_reg(m, reg, value)
        self.pump.service()

    def expect_rx(self, f: bytes) -> bytes | None:
        self.twin.wire_receive(f)
        return self.twin.take_in(EP_RX, 16384)

    def read_in(self, n: int) -> bytes:
        buf = b""

        def more() -> bool:
            nonlocal buf
            try:
                buf += os.read(self.in_r, n - len(buf))
            except BlockingIOError:
                pass
            return len(buf) >= n
        until(more, f"{n} bytes on EP 0x81")
        return buf

    def host_tx(self, transfer: bytes) -> None:
        before = self.pump.stats()["tx_transfers"] + self.pump.stats()["deferred_out"]
        os.write(self.out_w, transfer)
        until(lambda: self.pump.stats()["tx_transfers"] + self.pump.stats()["deferred_out"] > before,
              "the pump taking the OUT transfer")
        self.twin.bulk_out(EP_TX, transfer)

    def close(self) -> None:
        self.pump.close()
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            os.close(fd)
        self.wire.close()
        self.peer.close()


@pytest.fixture
def rig():
    r = PipeRig()
    yield r
    r.close()


RX_COUNTERS = ("rx_frames", "rx_bytes", "rx_transfers", "rx_dropped_filter", "rx_dropped_disabled",
               "rx_dropped_size")
TX_COUNTERS = ("tx_transfers", "tx_frames", "tx_bytes", "tx_malformed", "tx_extra_bytes", "tx_missing_pad",
               "tx_dropped_disabled")


def counters(m: PegasusModel, names: tuple[str, ...]) -> dict[str, int]:
    return {k: getattr(m.counters, k) for k in names}


def test_rx_transfers_and_drops_match_the_model(rig):
    mcast = bytes.fromhex("01005e0000fb")
    h = _hash_bit(mcast)
    cases = [frame(MAC), frame(b"\xff" * 6), frame(PEER), frame(mcast), frame(MAC)[:10], frame(MAC, 1514),
             frame(MAC, 508),                       # 508 + 4 = 512: needs a ZLP
             "hash", frame(mcast, 90), frame(MAC, 77)]
    for f in cases:
        if f == "hash":                             # now the multicast group is in the filter
            rig.both(MulticastHash + (h >> 3), 1 << (h & 7))
            continue
        want = rig.expect_rx(f)
        rig.peer.send(f)
        if want is None:
            until(lambda: rig.pump.stats()["wire_in"] >= rig.twin.counters.rx_frames
                  + rig.twin.counters.rx_dropped_filter + rig.twin.counters.rx_dropped_size, "the drop")
            continue
        assert rig.read_in(len(want)) == want, f"frame of {len(f)} bytes to {f[:6].hex()}"
    rig.pump.fold()
    assert counters(rig.model, RX_COUNTERS) == counters(rig.twin, RX_COUNTERS)
    assert rig.twin.counters.rx_dropped_filter == 2 and rig.twin.counters.rx_dropped_size == 1
    assert rig.ffs.zlps == 1                          # the 512-byte transfer


def test_rx_with_crc_promisc_and_disabled(rig):
    rig.both(EthCtrl0, 0xC8 | CTL0_INCLUDE_CRC)
    rig.both(EthCtrl2, 0x05)                          # promiscuous
    for f in (frame(PEER), frame(MAC, 200)):
        want = rig.expect_rx(f)
        assert want is not None
        rig.peer.send(f)
        assert rig.read_in(len(want)) == want
    rig.both(EthCtrl0, 0x88)                          # RX off
    rig.expect_rx(frame(MAC))
    rig.peer.send(frame(MAC))
    until(lambda: rig.pump.stats()["rx_dropped_disabled"] == 1, "the drop with RX disabled")
    rig.pump.fold()
    assert counters(rig.model, RX_COUNTERS) == counters(rig.twin, RX_COUNTERS)


def test_tx_frames_and_framing_faults_match_the_model(rig):
    good = frame(PEER, 100)
    padded = frame(PEER, 62)                          # 62 + 2 = 64: the host adds a pad byte
    transfers = [len(good).to_bytes(2, "little") + good,
                 len(padded).to_bytes(2, "little") + padded + b"\0",
                 len(padded).to_bytes(2, "little") + padded,             # pad missing
                 b"\x00\x00" + good,                                      # length 0
                 (2000).to_bytes(2, "little") + good,                     # longer than the transfer
                 len(good).to_bytes(2, "little") + good + b"xyz"]        # extra bytes
    for t in transfers:
        rig.host_tx(t)
    got = []
    rig.peer.settimeout(0.2)
    while True:
        try:
            got.append(rig.peer.recv(4096))
        except (socket.timeout, BlockingIOError):
            break
    assert got == [good, padded, padded, good]
    rig.pump.fold()
    assert counters(rig.model, TX_COUNTERS) == counters(rig.twin, TX_COUNTERS)
    assert rig.model.counters.tx_missing_pad == 1 and rig.model.counters.tx_malformed == 2


def test_loopback_goes_through_the_model_and_back_to_the_host(rig):
    """Loopback is not modelled in C: the OUT transfer is handed to the model, whose RX queue
    the pump then sends to the host ahead of wire frames."""
    rig.both(EthCtrl2, 0x01 | 0x08)
    f = frame(MAC, 70)
    rig.host_tx(len(f).to_bytes(2, "little") + f)
    rig.pump.service()
    want = rig.twin.take_in(EP_RX, 16384)
    assert want is not None and want.startswith(f)
    assert rig.read_in(len(want)) == want
    assert rig.pump.stats()["deferred_out"] == 1 and rig.pump.stats()["injected_in"] == 1
    assert rig.model.counters.tx_loopback == 1


def test_injected_garbage_reaches_the_host_through_the_pump(rig):
    rig.model.inject_rx_garbage("truncated")
    rig.model.inject_rx_garbage("empty")
    rig.pump.service()
    assert rig.read_in(3) == b"\x40\x00\x00"
    until(lambda: rig.pump.stats()["injected_in"] == 2, "both injected transfers sent")
    assert rig.model.counters.rx_garbage_injected == 2
