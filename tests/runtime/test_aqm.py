"""CoDel on the TX journal: the queue in front of the device stays short under a bulk flow.

The journal's clock is the test's here (TxJournal.clock / the `now` argument), so every
verdict is deterministic; the datapath tests age the journaled frames instead of waiting."""
from __future__ import annotations

import math
import random
import struct

import pytest

from udrv import fastpath
from udrv.drivers.e1000 import E1000
from udrv.journal import HEADER, TxJournal, mark_ce
from udrv.models.pci import ModelPciTransport
from udrv.models.e1000 import E1000Model
from udrv.nic import Nic, NicOptions

from rigs import Rig, frame_to

E1000Native = E1000.c_variant()     # the same driver on the C ring

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1_000 * MS

    def __call__(self) -> int:
        return self.t


def journal(nslots: int = 1024, **aqm) -> tuple[TxJournal, Clock]:
    j = TxJournal(nslots, 128)
    clock = Clock()
    j.clock = clock
    j.set_aqm(**aqm)
    return j, clock


def drain_one(j: TxJournal, clock: Clock, step_ns: int) -> tuple[int, bool]:
    """The datapath's part: judge the next entry, then hand it on (or drop it) and confirm it."""
    clock.t += step_ns
    seq = j.peek_unsent()[0]
    dropped = j.aqm_drop()
    j.mark_sent(seq)
    j.confirm_through(seq)
    return seq, dropped


def test_a_standing_queue_is_dropped_after_one_interval_then_at_codels_rate() -> None:
    """A device taking 1 ms per frame behind a sender that keeps 50 frames queued: the sojourn
    is 50 ms, above the 5 ms target; the first drop comes one interval (100 ms) after the first
    frame seen above target, the next ones at interval/sqrt(count) (RFC 8289's control law)."""
    j, clock = journal()
    for _ in range(50):
        j.append(b"x" * 60)
    drops_at = []
    for _ in range(400):
        j.append(b"x" * 60)                     # one in for each one out: the queue stands
        seq, dropped = drain_one(j, clock, MS)
        if dropped:
            drops_at.append(clock.t)
    first_seen = 1_000 * MS + 5 * MS              # the first judged at 5 ms of sojourn or more
    assert drops_at[0] == first_seen + 100 * MS
    gaps = [b - a for a, b in zip(drops_at, drops_at[1:])]
    for count, gap in enumerate(gaps[:5], start=1):       # the clock moves in 1 ms steps
        assert abs(gap - 100 * MS / math.sqrt(count)) < MS
    assert j.aqm_drops == len(drops_at) and j.aqm_marks == 0


def test_a_burst_shorter_than_an_interval_passes_untouched() -> None:
    j, clock = journal()
    for _ in range(80):
        j.append(b"x" * 60)
    drops = [drain_one(j, clock, MS)[1] for _ in range(80)]    # 80 ms above target, then empty
    assert not any(drops) and j.aqm_drops == 0


def test_a_queue_below_target_is_never_dropped() -> None:
    j, clock = journal()
    for _ in range(2000):
        j.append(b"x" * 60)
        j.append(b"x" * 60)
        drain_one(j, clock, 2 * MS)               # each waits ~4 ms: under the 5 ms target
        drain_one(j, clock, 0)
    assert j.aqm_drops == 0


def test_the_last_queued_entry_is_never_dropped() -> None:
    """Its drop could not be confirmed by a later completion (USB confirms in order), and
    CoDel leaves a queue of one packet alone anyway."""
    j, clock = journal()
    j.append(b"x" * 60)
    for _ in range(300):
        clock.t += 10 * MS                         # one entry, always 10 ms old when judged
        seq = j.peek_unsent()[0]
        assert not j.aqm_drop()
        j.mark_sent(seq)
        j.confirm_through(seq)
        j.append(b"x" * 60)
    assert j.aqm_drops == 0


def test_each_entry_is_judged_once_and_reissued_entries_never() -> None:
    """A datapath may look at an entry several times (a TSO entry cut piece by piece, a ring
    that was full); a recovery's re-issue must not turn into a loss."""
    j, clock = journal(interval=0.001)
    for _ in range(20):
        j.append(b"x" * 60)
    clock.t += 50 * MS
    assert not j.aqm_drop()                        # first above target: the interval starts
    assert not j.aqm_drop()                        # the same entry again: no second verdict
    j.mark_sent(j.peek_unsent()[0])
    clock.t += 2 * MS
    assert j.aqm_drop()                            # the next one, an interval later: dropped
    j.mark_sent(j.peek_unsent()[0])
    j.rewind()                                     # both go again after a recovery
    clock.t += 50 * MS
    assert [j.aqm_drop() for _ in range(1)] == [False]
    j.mark_sent(j.peek_unsent()[0])
    assert not j.aqm_drop()
    j.mark_sent(j.peek_unsent()[0])
    assert j.aqm_drops == 1


def test_changing_the_settings_starts_codel_afresh() -> None:
    """`udrv aqm` on a running daemon: no drop at an old rate before a new interval has passed."""
    j, clock = journal()
    for _ in range(50):
        j.append(b"x" * 60)
    drops = 0
    for _ in range(600):
        j.append(b"x" * 60)
        drops += drain_one(j, clock, MS)[1]
    assert drops >= 8                                # dropping, at a rate grown with count
    j.set_aqm(0)
    for _ in range(20):
        j.append(b"x" * 60)
        drain_one(j, clock, MS)
    j.set_aqm()                                      # back on: the standing queue is still there
    verdicts = []
    for _ in range(150):
        j.append(b"x" * 60)
        verdicts.append(drain_one(j, clock, MS)[1])
    assert not any(verdicts[:100]) and any(verdicts[100:])


def test_off_means_off() -> None:
    j, clock = journal(target=0)
    for _ in range(500):
        j.append(b"x" * 60)
    assert not any(drain_one(j, clock, 10 * MS)[1] for _ in range(499))


# --- ECN ---------------------------------------------------------------------------------------

def ipv4_frame(tos: int, tags: int = 0, n: int = 0) -> bytearray:
    """An IPv4 frame behind `tags` VLAN tags (802.1ad outer, 802.1Q inner); n in its payload."""
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 40, 7, 0x4000, 64, 6, 0,
                               bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    ip[10:12] = struct.pack("!H", ip_checksum(ip))
    tag = (b"\x88\xa8\x00\x07" + b"\x81\x00\x00\x05")[8 - 4 * tags:] if tags else b""
    return (bytearray(b"\x02\xaa\xbb\xcc\xdd\x02" + b"\x04" * 6 + tag + b"\x08\x00") + ip
            + n.to_bytes(4, "big") + bytes(16))


def ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv6_frame(tclass: int) -> bytearray:
    word = 6 << 28 | tclass << 20 | 0x12345
    ip = struct.pack("!IHBB16s16s", word, 20, 6, 64, bytes(16), bytes(15) + b"\x01")
    return bytearray(b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd") + ip + bytes(20)


@pytest.mark.parametrize("tags", [0, 1, 2])
@pytest.mark.parametrize("ect", [1, 2])
def test_ce_mark_on_ipv4_keeps_the_header_checksum_valid(ect: int, tags: int) -> None:
    f = ipv4_frame(0xB8 | ect, tags)
    l3 = 14 + 4 * tags
    assert mark_ce(f) == 1
    assert f[l3 + 1] == 0xBB and ip_checksum(bytes(f[l3:l3 + 20])) == 0
    assert mark_ce(f) == 1 and f[l3 + 1] == 0xBB   # CE already: left as it is


def test_ce_mark_on_ipv6_and_what_cannot_be_marked() -> None:
    f = ipv6_frame(0xB8 | 2)
    assert mark_ce(f) == 1
    assert (struct.unpack_from("!I", f, 14)[0] >> 20) & 0xFF == 0xBB
    assert mark_ce(ipv4_frame(0xB8)) == 0 and mark_ce(ipv6_frame(0)) == 0   # Not-ECT
    assert mark_ce(bytearray(b"\x02" * 12 + b"\x88\xb5" + bytes(46))) == -1


def judge(j: TxJournal, clock: Clock, n: int) -> list[bool]:
    """The verdicts on the next n entries, 2 ms apart, each handed on (or dropped) after."""
    verdicts = []
    for _ in range(n):
        seq = j.peek_unsent()[0]
        verdicts.append(j.aqm_drop())
        j.mark_sent(seq)
        clock.t += 2 * MS
    return verdicts


def test_an_ecn_capable_frame_is_marked_instead_of_dropped() -> None:
    j, clock = journal(interval=0.001)
    for tos in (2, 2, 0, 2):
        j.append(bytes(ipv4_frame(tos)))
    clock.t += 50 * MS
    assert judge(j, clock, 3) == [False, False, True]        # the interval's start, ECT marked, Not-ECT dropped
    assert (j.aqm_marks, j.aqm_drops) == (1, 1)
    marked = j.frame(1)
    assert marked[15] == 3 and ip_checksum(marked[14:34]) == 0
    assert j.frame(0)[15] == 2                    # the one judged below the line: untouched


def test_drop_only_when_ecn_is_off() -> None:
    j, clock = journal(interval=0.001, ecn=False)
    for _ in range(3):
        j.append(bytes(ipv4_frame(2)))
    clock.t += 50 * MS
    assert judge(j, clock, 2) == [False, True] and j.aqm_marks == 0


# --- C and Python run one CoDel ------------------------------------------------------------------

@pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")
@pytest.mark.parametrize("seed", range(4))
def test_c_and_python_give_the_same_verdicts_on_one_journal(seed: int) -> None:
    """The C rings and the Python datapaths take turns on one journal (and a worker process may
    take over): the same sequence of appends and judgments gives the same verdicts, marks and
    header bytes whichever side judges."""
    rng = random.Random(seed)
    ref, clock = journal(256, interval=0.02)
    shared = TxJournal(256, 128)
    shared.clock = clock
    shared.set_aqm(interval=0.02)
    c = fastpath.NativeJournal(shared)
    try:
        for step in range(6000):
            clock.t += rng.choice((0, 100_000, MS, 3 * MS))
            if rng.random() < 0.5 and ref.space():
                tos = rng.choice((0, 1, 2, 3))
                fr = bytes(ipv4_frame(tos)) if rng.random() < 0.7 else frame_to(b"\x02" * 6, step)
                ref.append(fr)
                shared.sync()
                shared.append(fr)
                continue
            if ref.unsent() == 0:
                continue
            seq = ref.peek_unsent()[0]
            want = ref.aqm_drop(clock.t)
            ref.mark_sent(seq)
            shared.sync()
            got = c.aqm_drop(clock.t) if rng.random() < 0.5 else shared.aqm_drop(clock.t)
            shared.sync()
            shared.mark_sent(seq)
            assert got == want, (seed, step)
            if rng.random() < 0.3:
                ref.confirm_through(seq)
                shared.confirm_through(seq)
            if rng.random() < 0.01:
                ref.rewind()
                shared.sync()
                shared.rewind()
        assert ref.aqm_drops > 10 and ref.aqm_marks > 10           # both verdicts exercised
        shared.sync()
        assert bytes(ref.mem[:HEADER]) == bytes(shared.mem[:HEADER])
        assert (c.aqm_drops, c.aqm_marks) == (ref.aqm_drops, ref.aqm_marks)
        for seq in range(ref.tail, ref.head):
            assert ref.frame(seq) == shared.frame(seq)              # the same frames marked CE
    finally:
        c.close()
        ref.close()
        shared.close()


# --- every datapath asks before it sends ---------------------------------------------------------

def _age(j: TxJournal) -> None:
    """Every unsent entry journaled long ago (stamp 0): what a standing queue looks like."""
    j.sync()
    for seq in range(j.sent, j.head):
        struct.pack_into("<Q", j.mem, HEADER + (seq & (j.nslots - 1)) * j.slot_size + 16, 0)


class _E1000Rig:
    def __init__(self, cls, **opts):
        self.model = E1000Model("82540em")
        self.transport = ModelPciTransport(self.model)
        self.wire: list[bytes] = []
        self.model.on_transmit = lambda fr: self.wire.append(bytes(fr))
        self.nic = Nic(cls, self.transport, lambda fr: None, NicOptions(n_rx=16, n_tx=8, **opts))
        self.nic.bring_up()
        self.nic.open()

    def close(self) -> None:
        self.nic.close()
        self.transport.close()


class _PegasusRig(Rig):
    @property
    def wire(self) -> list[bytes]:
        return self.wire_tx

    def close(self) -> None:
        self.nic.close()


def _rig(kind: str, **opts):
    if kind == "pegasus":
        return _PegasusRig(n_tx=4, **opts).up()
    return _E1000Rig(E1000Native if kind == "e1000-c" else E1000, **opts)


def _run_until_confirmed(nic: Nic) -> None:
    for _ in range(3000):
        nic.xmit()
        nic.poll(0.0)
        nic.journal.sync()
        if nic.journal.unconfirmed() == 0:
            return


DATAPATHS = ["pegasus", "e1000-python"] + (["e1000-c"] if fastpath.available() else [])


@pytest.mark.parametrize("kind", DATAPATHS)
def test_every_datapath_drops_what_waited_too_long_and_loses_nothing_else(kind: str, monkeypatch) -> None:
    """Aged frames behind a short TX ring (4-8 in flight): CoDel drops some; every other frame
    reaches the wire exactly once and in order, the last one included, the journal is fully
    confirmed, and `udrv status` counts the drops under tx_dropped['aqm']."""
    monkeypatch.delenv("UDRV_AQM", raising=False)
    rig = _rig(kind, aqm_target=1e-6, aqm_interval=1e-6)
    try:
        frames = [frame_to(b"\x02\xaa\xbb\xcc\xdd\x02", n, 80) for n in range(200)]
        assert rig.nic.enqueue(frames) == 200
        _age(rig.nic.journal)
        _run_until_confirmed(rig.nic)
        j = rig.nic.journal
        assert j.unconfirmed() == 0
        sent = [int.from_bytes(f[14:18], "big") for f in rig.wire if f[12:14] == b"\x88\xb5"]
        drops = j.aqm_drops
        assert 0 < drops < 200 and len(sent) == 200 - drops
        assert sent == sorted(set(sent)) and sent[-1] == 199
        assert rig.nic.status()["tx_dropped"].get("aqm") == drops
        assert rig.nic.status()["tx_journal"]["aqm_drops"] == drops
    finally:
        rig.close()


@pytest.mark.parametrize("kind", DATAPATHS)
def test_every_datapath_sends_the_ce_mark_it_was_given(kind: str, monkeypatch) -> None:
    """ECN-capable frames behind the same aged queue: none dropped, every one on the wire once,
    and as many carry CE (with a valid IPv4 checksum) as CoDel counted marks."""
    monkeypatch.delenv("UDRV_AQM", raising=False)
    rig = _rig(kind, aqm_target=1e-6, aqm_interval=1e-6)
    try:
        assert rig.nic.enqueue([bytes(ipv4_frame(2, n=n)) for n in range(200)]) == 200
        _age(rig.nic.journal)
        _run_until_confirmed(rig.nic)
        j = rig.nic.journal
        ip = [f for f in rig.wire if f[12:14] == b"\x08\x00"]
        assert j.unconfirmed() == 0 and j.aqm_drops == 0 and j.aqm_marks > 0
        assert [int.from_bytes(f[34:38], "big") for f in ip] == list(range(200))
        ce = [f for f in ip if f[15] & 3 == 3]
        assert len(ce) == j.aqm_marks and all(ip_checksum(f[14:34]) == 0 for f in ce)
    finally:
        rig.close()


@pytest.mark.parametrize("kind", DATAPATHS[:2])
def test_udrv_aqm_off_in_the_environment_sends_everything(kind: str, monkeypatch) -> None:
    monkeypatch.setenv("UDRV_AQM", "off")
    rig = _rig(kind, aqm_target=1e-6, aqm_interval=1e-6)
    try:
        rig.nic.enqueue([frame_to(b"\x02\xaa\xbb\xcc\xdd\x02", n, 80) for n in range(100)])
        _age(rig.nic.journal)
        _run_until_confirmed(rig.nic)
        assert len(rig.wire) == 100 and rig.nic.journal.aqm_drops == 0
        assert rig.nic.status()["tx_journal"]["aqm_target_ms"] == 0
    finally:
        rig.close()


@pytest.mark.parametrize("setting, want", [("2/40", (2.0, 40.0, True)), ("drop", (5.0, 100.0, False)),
                                           ("off", (0.0, 100.0, True)), ("bogus", (5.0, 100.0, True))])
def test_udrv_aqm_in_the_environment_sets_codel(setting: str, want: tuple, monkeypatch) -> None:
    monkeypatch.setenv("UDRV_AQM", setting)
    rig = _rig("pegasus")
    try:
        j = rig.nic.status()["tx_journal"]
        assert (j["aqm_target_ms"], j["aqm_interval_ms"], j["aqm_ecn"]) == want
    finally:
        rig.close()
