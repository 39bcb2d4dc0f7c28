"""The e1000 C ring reads the TAP itself (native/tapread.c): TAP frames reach the journal in C,
with Nic.enqueue's rules (oversize, virtio-net headers kept only when they ask for work, frames
only udrv.offload can judge handed back to Python), and a full journal leaves frames in the fd.

A SOCK_SEQPACKET socketpair stands in for the TAP fd (one frame per read, like a TAP); the
last test uses a real TAP (root only)."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from udrv import fastpath
from udrv.journal import HEADER, SLOT_HEADER

from journal_bytes import unstamped_slot
from udrv.models.pci import ModelPciTransport
from udrv.models.e1000 import E1000Model
from udrv.nic import Nic, NicOptions
from udrv.offload import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, VnetHdr
from udrv.drivers.e1000 import E1000

from frames import FakeTap, csum_udp, gso_tcp, mixed_items, payload_bytes, plain

E1000Native = E1000.c_variant()     # the same driver on the C ring

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")


class Rig:
    def __init__(self, tap: FakeTap | None, variant: str = "82574l", **opts):
        self.model = E1000Model(variant)
        self.transport = ModelPciTransport(self.model)
        self.wire: list[bytes] = []
        self.host_rx: list[bytes] = []
        self.model.on_transmit = lambda fr: self.wire.append(bytes(fr))
        opts.setdefault("n_rx", 64)
        opts.setdefault("n_tx", 256)
        self.tap = tap
        self.nic = Nic(E1000Native, self.transport, tap.write if tap else self.host_rx.append,
                       NicOptions(**opts))

    def up(self) -> "Rig":
        self.nic.bring_up()
        self.nic.open()
        return self

    def pump(self) -> None:
        for i in range(2000):
            self.nic.xmit()
            self.nic.poll(0.0)
            if i > 2 and self.nic.journal.unconfirmed() == 0:
                break

    def slots(self) -> list[bytes]:
        """Every journaled slot (slot header + payload), in order."""
        j = self.nic.journal
        j.sync()
        out = []
        for seq in range(j.tail, j.head):
            off = HEADER + (seq & (j.nslots - 1)) * j.slot_size
            length = struct.unpack_from("<I", j.mem, off)[0]
            out.append(unstamped_slot(bytes(j.mem[off: off + SLOT_HEADER + length])))
        return out

    def tap_view(self) -> tuple[int, int, dict[str, int]]:
        t = self.nic.tap_counts()
        return t.frames_in, t.offload_frames, t.dropped

    def close(self) -> None:
        self.nic.close()
        self.transport.close()
        if self.tap:
            self.tap.close()



def test_ring_owns_the_tap_only_with_a_tap_fd() -> None:
    with_tap, without = Rig(FakeTap(False)), Rig(None)
    try:
        assert with_tap.nic.engine.caps.reads_tap and not without.nic.engine.caps.reads_tap
        assert with_tap.nic.engine.tap_fallback == with_tap.nic.enqueue
    finally:
        with_tap.close()
        without.close()


def test_frames_reach_the_journal_byte_exact_and_oversize_is_counted() -> None:
    tap = FakeTap(False)
    r = Rig(tap)
    try:
        assert r.nic.vnet_hdr_len == 0
        frames = [plain(i, 60 + i * 97) for i in range(15)]          # up to 1418 bytes
        big = [plain(100, 1519), plain(101, 3000)]                   # > MTU + 18
        tap.inject(frames[:5] + big[:1] + frames[5:] + big[1:] + [plain(102, 1518)])
        assert r.nic.engine.pull_tap() == 16
        got = r.slots()
        assert [s[SLOT_HEADER:] for s in got] == frames + [plain(102, 1518)]
        assert all(struct.unpack_from("<I", s, 4)[0] == 0 for s in got)    # no vnet flag
        st = r.nic.status()
        assert st["tap_frames_in"] == 18 and st["tx_dropped"] == {"oversize": 2}
        # and they reach the wire through xmit() (which reads the TAP itself)
        r.up()
        tap.inject([plain(200), plain(201)])
        r.pump()
        assert [w[:len(f)] for w, f in zip(r.wire, frames)] == frames
        assert r.wire[-2:] == [plain(200), plain(201)]
        assert r.nic.status()["tap_frames_in"] == 20
    finally:
        r.close()


def test_full_journal_leaves_frames_in_the_fd() -> None:
    tap = FakeTap(False)
    r = Rig(tap, journal_slots=4)
    try:
        frames = [plain(i) for i in range(7)]
        tap.inject(frames)
        assert r.nic.engine.pull_tap() == 4
        assert r.nic.journal.space() == 0
        assert r.nic.engine.tap_reader_stats()["tap_journal_full"] == 1
        assert r.nic.engine.pull_tap() == 0                    # still full: nothing read
        assert [s[SLOT_HEADER:] for s in r.slots()] == frames[:4]
        assert r.nic.status()["tap_frames_in"] == 4 and r.nic.status()["tx_dropped"] == {}
        assert tap.left_in_fd() == frames[4:]                  # untouched, in order
    finally:
        r.close()


def test_budget_limits_one_call() -> None:
    tap = FakeTap(False)
    r = Rig(tap)
    try:
        tap.inject([plain(i) for i in range(10)])
        assert r.nic.engine.pull_tap(3) == 3
        assert r.nic.engine.pull_tap() == 7
        assert r.nic.engine.pull_tap() == 0
    finally:
        r.close()


def vnet_cases() -> list[bytes]:
    """Raw TAP reads (header + frame): every rule of Nic._enqueue_vnet."""
    raw = [(h or VnetHdr()).pack() + f for h, f in mixed_items()]
    h, f = gso_tcp(payload_bytes(20000, 9))
    udp_h, udp_f = csum_udp(payload_bytes(100))
    raw += [
        b"\x01\x00\x00",                                               # short header
        VnetHdr().pack() + plain(1, 1519),                              # oversize, asks nothing
        VnetHdr(flags=2).pack() + plain(2, 1518),                       # DATA_VALID: header dropped
        VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 80, 6).pack() + plain(3, 60),   # csum beyond frame
        VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 50, 9).pack() + plain(4, 60),   # field beyond frame
        udp_h.pack() + udp_f + b"\0" * 2000,                            # csum frame > MTU
        VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 9000, 34, 16).pack() + f,  # segment > MTU
        VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 60, 16).pack() + f[:70],   # TCP header cut
        VnetHdr(0, GSO_TCPV4, 66, 1448, 34, 16).pack() + f,             # GSO without NEEDS_CSUM
        h.pack() + f,
        VnetHdr(flags=0).pack() + plain(5, 64),
    ]
    return raw


def test_vnet_headers_match_the_python_path_byte_for_byte() -> None:
    cases = vnet_cases()
    tap = FakeTap(True)
    c, py = Rig(tap), Rig(None)
    try:
        assert c.nic.vnet_hdr_len == 12 and c.nic.engine._r.tap_vnet_hdr == 12
        tap.inject(cases)
        n_c = c.nic.engine.pull_tap(1000)
        n_py = py.nic.enqueue(cases, vnet_hdr_len=12)
        assert n_c == n_py > 10
        assert c.slots() == py.slots()
        frames, offl, drops = c.tap_view()
        assert frames == py.nic.counters.tap_frames_in == len(cases)
        assert offl == py.nic.counters.offload_frames
        assert drops == py.nic.counters.tx_dropped
        assert set(drops) == {"short_vnet_header", "oversize", "bad_offload_request"}
        assert c.nic.engine.tap_reader_stats()["tap_deferred"] >= 3        # UFO, ECN, GSO w/o csum
        assert c.nic.counters.software_frames == py.nic.counters.software_frames == 0
        st_c, st_py = c.nic.status(), py.nic.status()
        for k in ("tap_frames_in", "offload_frames", "tx_dropped"):
            assert st_c[k] == st_py[k]
    finally:
        c.close()
        py.close()


def test_vnet_frames_reach_the_wire_like_the_python_path() -> None:
    items = mixed_items()
    tap = FakeTap(True)
    c, py = Rig(tap).up(), Rig(None).up()
    try:
        tap.inject([(h or VnetHdr()).pack() + f for h, f in items])
        py.nic.enqueue([(h or VnetHdr()).pack() + f for h, f in items], vnet_hdr_len=12)
        c.pump()
        py.pump()
        assert c.wire == py.wire and len(c.wire) > len(items)
        assert c.nic.journal.unconfirmed() == 0
    finally:
        c.close()
        py.close()


def test_counts_survive_a_restart() -> None:
    tap = FakeTap(False)
    r = Rig(tap).up()
    try:
        tap.inject([plain(1), plain(2, 3000)])
        r.pump()
        r.nic.restart()
        assert r.nic.engine.caps.reads_tap and r.nic.engine.tap_fallback == r.nic.enqueue
        tap.inject([plain(3)])
        r.pump()
        st = r.nic.status()
        assert st["tap_frames_in"] == 3 and st["tx_dropped"] == {"oversize": 1}
        assert r.wire[-1] == plain(3)
    finally:
        r.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a real TAP needs root (CAP_NET_ADMIN)")
@pytest.mark.parametrize("offloads", [(), ("csum", "tso4")], ids=["plain", "vnet"])
def test_real_tap_frames_reach_the_journal(offloads, monkeypatch) -> None:
    from udrv.tap import Tap
    if not offloads:
        monkeypatch.setenv("UDRV_OFFLOADS", "none")     # Nic asks the TAP for what the chip can do
    try:
        tap = Tap("udrvtr0", offloads=offloads)
    except Exception as e:          # no /dev/net/tun in this container
        pytest.skip(f"no TAP: {e}")
    try:
        try:
            with open(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        model = E1000Model("82574l")
        transport = ModelPciTransport(model)
        nic = Nic(E1000Native, transport, tap.write, NicOptions(n_rx=64, n_tx=64))
        try:
            assert nic.engine.caps.reads_tap and nic.vnet_hdr_len == (12 if offloads else 0)
            tap.set_up(True)
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind((tap.name, 0))
            frames = [plain(i, 60 + 13 * i) for i in range(20)]
            for fr in frames:
                s.send(fr)
            s.close()
            got = []
            for _ in range(50):
                nic.engine.pull_tap()
                got = [x[SLOT_HEADER:] for x in _slots(nic) if x[SLOT_HEADER + 12:SLOT_HEADER + 14] == b"\x88\xb5"]
                if len(got) >= len(frames):
                    break
                import time
                time.sleep(0.01)
            assert got == frames
            assert nic.status()["tap_frames_in"] >= len(frames)
        finally:
            nic.close()
            transport.close()
    finally:
        tap.close()


def _slots(nic: Nic) -> list[bytes]:
    j = nic.journal
    j.sync()
    out = []
    for seq in range(j.tail, j.head):
        off = HEADER + (seq & (j.nslots - 1)) * j.slot_size
        length = struct.unpack_from("<I", j.mem, off)[0]
        out.append(unstamped_slot(bytes(j.mem[off: off + SLOT_HEADER + length])))
    return out


def test_deferred_frame_without_a_taker_is_counted_and_dropped() -> None:
    tap = FakeTap(True)
    r = Rig(tap)
    try:
        r.nic.engine.set_tap_fallback(None)
        h, f = gso_tcp(payload_bytes(3000))
        tap.inject([VnetHdr(0, GSO_TCPV4, 66, 1448, 34, 16).pack() + f, VnetHdr().pack() + plain(7)])
        assert r.nic.engine.pull_tap() == 1
        assert [s[SLOT_HEADER:] for s in r.slots()] == [plain(7)]
        st = r.nic.status()
        assert st["tap_frames_in"] == 2 and st["tx_dropped"] == {"unhandled_offload": 1}
    finally:
        r.close()


def test_a_deferred_frame_a_dead_worker_never_handed_over_is_rescued_by_its_successor() -> None:
    """The C reader leaves the frame it defers to Python in the slot it read it into, marked:
    if the worker dies before Python journals it, the next worker finds it there."""
    from udrv.journal import TxJournal
    tap = FakeTap(True)
    r = Rig(tap)
    try:
        class Died(Exception):
            pass

        def die(*_a, **_k):
            raise Died                                        # the worker's end, as Python takes it

        r.nic.engine.set_tap_fallback(die)
        _h, f = gso_tcp(payload_bytes(3000))
        raw = VnetHdr(0, GSO_TCPV4, 66, 1448, 34, 16).pack() + f    # deferred: GSO without NEEDS_CSUM
        tap.inject([raw])
        with pytest.raises(Died):
            r.nic.engine.pull_tap()
        j = r.nic.journal
        successor = TxJournal.attach(os.dup(j.fd), j.nslots, j.slot_size)
        assert successor.unfinished_read(r.nic.vnet_hdr_len) == (True, raw)
    finally:
        r.close()
