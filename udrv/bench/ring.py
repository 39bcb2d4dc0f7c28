"""e1000 datapath benchmarks (commands, not tests): each reports a ratio against a baseline
measured in the same run, as udrv.bench does (medians over interleaved rounds, CPU time of
this process via time.process_time, so other load on a shared machine disturbs it less).

  ring_speed        `udrv bench ring`: the C e1000 ring vs the pure-Python ring, TX and RX,
                    with the device side stubbed (FakeDevice) so the ring's own work is measured
  tap_forward       `udrv bench tap` (root): frames read from a TAP and written back to it,
                    through udrv's C path vs a bare C read/write loop (and a bare Python loop,
                    for reference)
  guard_overhead_e1000
                    `udrv bench guard --driver e1000`: guards on / off on the e1000 C datapath

The device side: the e1000 model is Python and would dominate every number, so after the
driver has come up on the model (probe, open: everything the model checks) the transport is
switched to a stub written in C (native/rigs/tapfwd.c, `udrv_fakedev_*`): a TDT write marks the TX
descriptors up to it done (DD) -- in loopback mode it first copies each packet into the next
armed RX buffer and writes that RX descriptor back; an RDT write (RX fill mode) writes back every
armed RX descriptor as a received frame of a fixed length whose bytes were put in the buffers
beforehand. The same stub serves both rings, so its (small) cost is in both sides of a ratio.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import statistics
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .recovery import GuardOverhead, _guard_call_ns
from ..errors import UdrvError
from ..testbed.rigs import lib as _rigs_lib      # None without the bench C (_native() says why)

# e1000 register offsets (BAR0) the stub answers itself once engaged
RDH, RDT, TDH, TDT = 0x2810, 0x2818, 0x3810, 0x3818
C_SCALE = 10                # the C ring runs this many times more frames per round (short rounds are noisy)
PEER = bytes.fromhex("02aabbccdd01")
DST = bytes.fromhex("02c0ffee0001")


def _native() -> tuple[Any, Any]:
    """The runtime's C (the journal, the C ring), once the bench C it is measured with loads too."""
    from .. import fastpath
    if not fastpath.available():
        raise UdrvError(f"the e1000 benches need the C fast path: {fastpath.why_unavailable()}")
    _rigs()
    return fastpath.ffi, fastpath.lib


def _rigs() -> tuple[Any, Any]:
    """The bench C (the device stub, the TAP loops: native/rigs/tapfwd.c)."""
    from ..testbed import rigs
    if not rigs.available():
        raise UdrvError(f"the e1000 benches need their C (udrv._rigs): {rigs.why_unavailable()}")
    return rigs.ffi, rigs.lib


def bench_frame(size: int, dst: bytes = DST, src: bytes = PEER) -> bytes:
    if not 60 <= size <= 1514:
        raise UdrvError(f"frame size {size} is outside 60..1514 bytes (Ethernet without FCS, MTU 1500)")
    return dst + src + b"\x88\xb5" + bytes(i & 0xFF for i in range(size - 14))


def _median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} (range {min(xs):.2f}..{max(xs):.2f})"


# --- the stubbed device ------------------------------------------------------------------------------
class FakeDevice:
    """A PciTransport in front of the e1000 model's: everything goes to the model until
    `engage()`, then TDT/RDT writes and TDH/RDH reads are answered by the C stub (the model no
    longer sees the rings move). Everything else (config, DMA allocation) stays the model's."""

    def __init__(self, real: Any):
        self._real = real
        self._d: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def engage(self, rings: Any, *, loop: bool) -> None:
        ffi, _ = _rigs()
        d = ffi.new("struct udrv_fakedev *")
        d.tx_ring = ffi.cast("uint8_t *", rings.tx_ring.vaddr)
        d.tx_buf = ffi.cast("uint8_t *", rings.tx_bufs.vaddr)
        d.rx_ring = ffi.cast("uint8_t *", rings.rx_ring.vaddr)
        d.rx_buf = ffi.cast("uint8_t *", rings.rx_bufs.vaddr)
        d.tx_buf_iova, d.rx_buf_iova = rings.tx_bufs.iova, rings.rx_bufs.iova
        d.n_tx, d.n_rx, d.tx_bufsize, d.rx_bufsize = rings.tx_count, rings.rx_count, rings.tx_bufsize, rings.rx_bufsize
        real = self._real
        d.tdh, d.rdh, d.rdt = real.read32(TDH), real.read32(RDH), real.read32(RDT)
        if real.read32(TDT) != d.tdh:
            raise UdrvError("the model still has TX descriptors outstanding: engage the stub on an idle ring")
        d.loop = int(loop)
        self._d = d

    def disengage(self) -> None:
        self._d = None

    @property
    def state(self) -> Any:
        return self._d

    def set_rx_len(self, length: int) -> None:
        """RX fill mode: frames of `length` bytes from now on (0: none); fills what is armed."""
        _, lib = _rigs()
        self._d.rx_len = length
        lib.udrv_fakedev_rdt(self._d, self._d.rdt)

    def write32(self, offset: int, value: int) -> None:
        d = self._d
        if d is not None:
            if offset == TDT:
                _rigs_lib.udrv_fakedev_tdt(d, value)
                return
            if offset == RDT:
                _rigs_lib.udrv_fakedev_rdt(d, value)
                return
        self._real.write32(offset, value)

    def read32(self, offset: int) -> int:
        d = self._d
        if d is not None:
            if offset == TDH:
                return d.tdh
            if offset == RDH:
                return d.rdh
            if offset == TDT:
                return d.tdh          # everything handed out is done at once
            if offset == RDT:
                return d.rdt
        return self._real.read32(offset)


class FdSink:
    """A frame sink writing to an fd. The C ring recognises its bound `write` (udrv.pciring
    tap_fd_of) and writes from C; the Python ring calls it per frame (os.write)."""

    vnet_hdr_len = 0                  # frames only, as a TAP without offloads

    def __init__(self, fd: int):
        self.fd = fd
        self.errors = 0

    def write(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:
            self.errors += 1

    def fileno(self) -> int:
        return self.fd


def _null_sink(frame: bytes) -> None:
    pass


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Rig:
    """An e1000 driver (Python or C ring) brought up and opened on the model, then put on the
    stub. `guards` as in NicOptions; the ring's entry points can be called directly
    (`engine`) or through the Nic (guarded)."""

    def __init__(self, cls: Any, sink: Callable[[bytes], None], *, loop: bool, n: int = 256,
                 guards: bool = False, journal_slots: int = 1024):
        from ..models.pci import ModelPciTransport
        from ..models.e1000 import E1000Model
        from ..nic import Nic, NicOptions
        ffi, lib = _native()
        self.model = E1000Model("82540em")
        self.transport = ModelPciTransport(self.model)
        self.fake = FakeDevice(self.transport)
        self.nic: Any = None
        self._cj_mapped = False
        try:
            # no offloads: no virtio-net headers anywhere (the bare loops have none either)
            with _env("UDRV_OFFLOADS", "none"):
                self.nic = Nic(cls, self.fake, sink, NicOptions(guards=guards, n_rx=n, n_tx=n,
                                                                journal_slots=journal_slots,
                                                                gso_journal_slots=journal_slots))
            self.nic.bring_up()
            self.nic.open()
            self.fake.engage(self.nic.driver.rings, loop=loop)
            # the journal's memfd mapped from C: refills between timed batches cost (almost) nothing
            self.cj = ffi.new("struct udrv_journal *")
            j = self.nic.journal
            if lib.udrv_journal_map_fd(self.cj, j.fd, j.nslots, j.slot_size) < 0:
                raise UdrvError("cannot map the TX journal from C")
            self._cj_mapped = True
        except BaseException:
            self.close()
            raise

    @property
    def engine(self) -> Any:
        return self.nic.engine

    def refill(self, frame: bytes, count: int) -> int:
        """Append `count` copies of frame to the journal (from C), as many as fit."""
        _, lib = _native()
        cj, n = self.cj, len(frame)
        done = 0
        for _ in range(count):
            if lib.udrv_journal_append(cj, frame, n) < 0:
                break
            done += 1
        self.nic.journal.sync()
        return done

    def fill_rx_buffers(self, frame: bytes) -> None:
        mem = self.nic.driver.rings
        bs, view = mem.rx_bufsize, mem.rx_bufs.view
        for i in range(mem.rx_count):
            view[i * bs:i * bs + len(frame)] = frame

    def drain_rx(self) -> None:
        """RX fill off, harvest whatever the stub had written back (untimed)."""
        self.fake.set_rx_len(0)
        for _ in range(4):
            self.engine.poll(0.0)

    def close(self) -> None:
        _, lib = _native()
        if self._cj_mapped:
            lib.udrv_journal_unmap(self.cj)
            self._cj_mapped = False
        self.fake.disengage()              # the driver's stop talks to the model again
        if self.nic is not None:
            self.nic.close()
            self.nic = None
        self.transport.close()


# --- 1. the ring: C vs Python ----------------------------------------------------------------------
RING_CASES = (("tx", "TX"), ("rx_call", "RX -> Python callable"), ("rx_fd", "RX -> fd (/dev/null)"))


@dataclass
class RingSize:
    size: int
    ns: dict[tuple[str, str], list[float]] = field(default_factory=dict)    # (case, impl) -> ns/packet per round

    def add(self, case: str, impl: str, ns: float) -> None:
        self.ns.setdefault((case, impl), []).append(ns)

    def ratios(self, case: str) -> list[float]:
        return [p / c for p, c in zip(self.ns[(case, "py")], self.ns[(case, "c")])]

    def own_rx(self, impl: str) -> list[float]:
        """RX -> fd minus the write() floor measured in the same round: the ring's own RX work."""
        return [a - b for a, b in zip(self.ns[("rx_fd", impl)], self.ns[("floor", impl)])]


@dataclass
class RingSpeed:
    frames: int
    rounds: int
    ring: int
    sizes: list[RingSize] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"e1000 ring: C ring (PciNativeRing) vs Python ring (PciRing), {self.ring}-descriptor rings, "
            f"{self.rounds} interleaved rounds; per round {self.frames} frames per case for the Python ring, "
            f"{self.frames * C_SCALE} for the C ring",
            "  device side: a C stub (native/rigs/tapfwd.c), not the Python model: a TDT write sets DD on every TX "
            "descriptor up to it (the frame is not read); an RDT write writes back every armed RX descriptor "
            "as a received frame (DD|EOP + length; the frame bytes were put in the buffers beforehand, so the "
            "device's DMA copy is not counted)",
            "  timed, TX: the ring's xmit() (journal peek -> descriptor + copy into the DMA buffer, one TDT write "
            "per batch) + poll() (RX check, reclaim: DD check, journal confirm); not timed: the journal append "
            "(done from C between timed batches of up to 1024 frames)",
            "  timed, RX: the ring's poll() (harvest: status/length checks, frame out of the DMA buffer into the "
            "sink, re-arm, one RDT write per batch of up to 255)",
            "  sinks: 'Python callable' = a Python function that does nothing (the Python ring calls it per frame;"
            " the C ring packs frames into a buffer and its Python wrapper calls it per frame); 'fd' = /dev/null "
            "(Python ring: os.write per frame via the sink; C ring: write() from C, no Python per frame)",
            "  'write() alone' = the same frame written to /dev/null in a loop (C / Python), measured in the same "
            "rounds; the derived row subtracts it from 'RX -> fd' to show the ring's own RX work",
            "  entry points called directly (no guard); CPU time of this process (time.process_time); medians "
            "over rounds, ratio = median of per-round ratios (Python ns / C ns)",
            "",
            "| size | case | Python ring ns/pkt | Python Mpps | C ring ns/pkt | C Mpps | C / Python (target >= 20x) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.sizes:
            for case, label in RING_CASES:
                py, c = statistics.median(s.ns[(case, "py")]), statistics.median(s.ns[(case, "c")])
                r = s.ratios(case)
                lines.append(f"| {s.size} B | {label} | {py:,.0f} | {1e3 / py:.3f} | {c:,.1f} | {1e3 / c:.2f} | "
                             f"{_median_range(r)}x{'' if statistics.median(r) >= 20 else ' (below target)'} |")
            fpy, fc = statistics.median(s.ns[("floor", "py")]), statistics.median(s.ns[("floor", "c")])
            lines.append(f"| {s.size} B | write() to /dev/null alone (the fd sink's floor: os.write loop / C loop) | "
                         f"{fpy:,.0f} | | {fc:,.1f} | | |")
            opy, oc = s.own_rx("py"), s.own_rx("c")
            pairs = [a / b for a, b in zip(opy, oc) if b > 0]
            ratio = f"{_median_range(pairs)}x" if len(pairs) == len(oc) else "n/a (C below the floor's noise)"
            lines.append(f"| {s.size} B | RX -> fd minus the floor (derived: the ring's own RX work) | "
                         f"{statistics.median(opy):,.0f} | | {statistics.median(oc):,.1f} | | {ratio} |")
        return "\n".join(lines)


def _tx_ns(rig: Rig, frame: bytes, frames: int) -> float:
    engine, journal = rig.engine, rig.nic.journal
    clock = time.process_time
    batch = min(journal.nslots, 1024)
    done, cpu = 0, 0.0
    before = rig.engine.counters.tx_packets
    while done < frames:
        k = rig.refill(frame, min(batch, frames - done))
        if k == 0:
            raise UdrvError("the TX journal did not drain (the ring stopped confirming)")
        t0 = clock()
        while journal.unconfirmed():
            engine.xmit()
            engine.poll(0.0)
        cpu += clock() - t0
        done += k
    moved = rig.engine.counters.tx_packets - before
    if moved != done:
        raise UdrvError(f"TX bench: {done} frames journaled but the ring counted {moved} sent")
    return cpu / done * 1e9


def _rx_ns(rig: Rig, size: int, frames: int) -> float:
    engine = rig.engine
    clock = time.process_time
    before = engine.counters.rx_packets
    rig.fake.set_rx_len(size)
    got = 0
    t0 = clock()
    while got < frames:
        n = engine.poll(0.0)
        if n == 0:
            raise UdrvError("RX bench: the ring harvested nothing from a filled ring")
        got += n
    cpu = clock() - t0
    rig.drain_rx()
    moved = engine.counters.rx_packets - before
    if moved < got:
        raise UdrvError(f"RX bench: {got} descriptors harvested but {moved} frames delivered")
    return cpu / got * 1e9


def _write_floor_ns(impl: str, fd: int, frame: bytes, frames: int) -> float:
    """What delivering to the fd costs alone: write() of the frame, from C or os.write."""
    ffi, lib = _rigs()
    clock = time.process_time
    if impl == "c":
        buf = ffi.from_buffer(frame)
        t0 = clock()
        n = lib.udrv_tapfwd_inject(fd, buf, len(frame), frames)
        return (clock() - t0) / max(1, n) * 1e9
    write = os.write
    t0 = clock()
    for _ in range(frames):
        write(fd, frame)
    return (clock() - t0) / frames * 1e9


def ring_speed(sizes: list[int] | None = None, frames: int = 20000, rounds: int = 7, ring: int = 256) -> RingSpeed:
    from ..drivers.e1000 import E1000
    E1000Native = E1000.c_variant()
    _native()
    sizes = sizes or [64, 1500]
    frames_ = {"py": frames, "c": frames * C_SCALE}
    res = RingSpeed(frames, rounds, ring)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)   # readable: a ring reading its "TAP" finds it empty
    rigs: dict[tuple[str, str], Rig] = {}
    try:
        for impl, cls in (("py", E1000), ("c", E1000Native)):
            rigs[("call", impl)] = Rig(cls, _null_sink, loop=False, n=ring)
            rigs[("fd", impl)] = Rig(cls, FdSink(null).write, loop=False, n=ring)
        if not rigs[("fd", "c")].engine.writes_tap:
            raise UdrvError("the C ring did not take the fd sink (it would call Python per frame)")
        big = bench_frame(max(sizes))
        for rig in rigs.values():
            rig.fill_rx_buffers(big)
        for size in sizes:
            frame = bench_frame(size)
            rs = RingSize(size)
            for impl in ("py", "c"):       # warm-up (not recorded)
                warm = max(300, frames_[impl] // 10)
                _tx_ns(rigs[("call", impl)], frame, warm)
                _rx_ns(rigs[("call", impl)], size, warm)
                _rx_ns(rigs[("fd", impl)], size, warm)
            for i in range(rounds):
                order = ("py", "c") if i % 2 == 0 else ("c", "py")
                for case in ("tx", "rx_call", "rx_fd", "floor"):
                    for impl in order:
                        n = frames_[impl]
                        if case == "tx":
                            rs.add(case, impl, _tx_ns(rigs[("call", impl)], frame, n))
                        elif case == "floor":
                            rs.add(case, impl, _write_floor_ns(impl, null, frame, n))
                        else:
                            rs.add(case, impl, _rx_ns(rigs[("call" if case == "rx_call" else "fd", impl)], size, n))
            res.sizes.append(rs)
    finally:
        for rig in rigs.values():
            rig.close()
        os.close(null)
    return res


# --- 2. TAP forwarding: udrv's C path vs a bare C loop ----------------------------------------------
SIOCSIFTXQLEN = 0x8943
TAP_CASES = ("bare_c", "bare_py", "udrv", "udrv_cread")


@dataclass
class TapForward:
    frames: int
    rounds: int
    size: int
    ring_reads_tap: bool = False      # the C ring reads the TAP itself (owns_tap) in this build
    injected: list[int] = field(default_factory=list)
    pps: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratios(self, case: str) -> list[float]:
        return [a / b for a, b in zip(self.pps[case], self.pps["bare_c"])]

    def labels(self) -> dict[str, str]:
        rest = "-> journal -> C ring TX -> stub loopback -> C ring RX -> write() to the TAP"
        read = ("TAP read in C by the ring itself (owns_tap, inside xmit)" if self.ring_reads_tap
                else "Python TAP read (Tap.read_batch) + Nic.enqueue")
        return {"bare_c": "bare C loop (read/write, native/rigs/tapfwd.c)",
                "bare_py": "bare Python loop (os.read/os.write)",
                "udrv": f"udrv, the daemon's loop: {read} {rest}",
                "udrv_cread": f"udrv with the TAP read in C (native/rigs/tapfwd.c reader, not the daemon's) {rest}"}

    def report(self) -> str:
        lines = [
            f"TAP forwarding, {self.size} B frames, one core, {self.rounds} interleaved rounds of up to "
            f"{self.frames} frames per case (median {statistics.median(self.injected):.0f} forwarded per run)",
            "  set-up: one TAP (no virtio-net headers, IPv6 off), as the daemon has; before each timed run an "
            "AF_PACKET socket sends the frames on it (not timed), so they queue on the TAP's fd; the timed run "
            "reads them all and writes each back into the same TAP (the kernel receives it: ethertype 0x88b5, "
            "another host's MAC, dropped), until the TAP has nothing left",
            "  rate = frames forwarded / CPU time of this process (time.process_time: user + system, so the "
            "kernel's TAP work is included); medians over rounds; ratio = median of per-round ratios to the bare "
            "C loop",
            "  udrv: Nic.xmit / Nic.poll as daemon.run calls them (xmit, poll, xmit per turn, TAP batches of 64), "
            "guards on (no watchdog thread), e1000 C ring (PciNativeRing), 256-descriptor rings; the e1000 "
            "device side stubbed in C with TX looped back into RX (see `udrv bench ring`)",
            "",
            "| path | Mpps | ns/frame | ns/frame more than bare C | / bare C |",
            "|---|---|---|---|---|",
        ]
        base = statistics.median(self.pps["bare_c"])
        labels = self.labels()
        for case in TAP_CASES:
            if case not in self.pps:
                continue
            pps = statistics.median(self.pps[case])
            ratio = "1" if case == "bare_c" else _median_range(self.ratios(case))
            if case == "udrv":
                ratio += " (target >= 0.5)" if statistics.median(self.ratios(case)) >= 0.5 else " (below target 0.5)"
            extra = "" if case == "bare_c" else f"{1e9 / pps - 1e9 / base:+,.0f}"
            lines.append(f"| {labels[case]} | {pps / 1e6:.3f} | {1e9 / pps:,.0f} | {extra} | {ratio} |")
        lines.append("")
        lines.append(f"  note: this machine's bare C loop runs at {base / 1e6:.2f} Mpps ({1e9 / base:,.0f} ns per frame: "
                     "one TAP read + one TAP write, almost all of it in the kernel). The ratio depends on that: the "
                     "'more than bare C' column is what udrv adds per frame; on a machine with cheaper syscalls "
                     "(a faster bare loop) the same addition gives a lower ratio")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ifreq_int(name: str, value: int) -> bytes:
    return struct.pack("16si", name.encode(), value).ljust(40, b"\0")


def _quiet_interface(name: str) -> None:
    """No IPv6 (router solicitations, MLD) on the bench TAP: only our frames move."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass


def _read_all(fd: int) -> int:
    n = 0
    while True:
        try:
            os.read(fd, 65536)
        except BlockingIOError:
            return n
        n += 1


def _bare_py(fd: int) -> int:
    read, write = os.read, os.write
    n = 0
    while True:
        try:
            f = read(fd, 2048)
        except BlockingIOError:
            return n
        try:
            write(fd, f)
        except OSError:
            pass
        n += 1


def tap_forward(frames: int = 20000, rounds: int = 7, size: int = 64, batch: int = 64) -> TapForward:
    from ..drivers.e1000 import E1000
    E1000Native = E1000.c_variant()
    from ..tap import Tap
    _native()
    ffi, lib = _rigs()                # every call below is the bench C's; the rig maps the journal
    if os.geteuid() != 0:
        raise UdrvError("udrv bench tap needs root (it creates a TAP interface): run it with sudo")
    frame = bench_frame(size)
    res = TapForward(frames, rounds, size)
    tap = sock = rig = None
    try:
        tap = Tap(f"ubr{os.getpid() % 1000000}")
        _quiet_interface(tap.name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFTXQLEN, _ifreq_int(tap.name, frames + 4096))   # room for a whole run
        tap.set_up(True)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)     # protocol 0: sends only
        sock.bind((tap.name, 0))
        rig = Rig(E1000Native, tap.write, loop=True, guards=True, journal_slots=1024)
        nic, journal, engine = rig.nic, rig.nic.journal, rig.nic.engine
        if not getattr(engine, "writes_tap", False):
            raise UdrvError("the C ring did not take the TAP's fd (it would call Python per frame)")
        res.ring_reads_tap = bool(getattr(engine, "owns_tap", False))
        st = ffi.new("struct udrv_tapfwd_stats *")
        fd = tap.fd

        def udrv(c_read: bool) -> int:
            before = engine.counters.rx_packets
            idle = 0
            while idle < 2:
                got = 0
                space = journal.space()
                if c_read:
                    if space:
                        got = lib.udrv_tapfwd_to_journal(fd, rig.cj, min(batch, space), st)
                        journal.sync()
                elif not res.ring_reads_tap and space:       # daemon.run: Python reads unless the ring does
                    got = nic.enqueue(tap.read_batch(min(batch, space)))
                moved = nic.xmit()
                nic.poll(0.0)
                moved += nic.xmit()
                idle = idle + 1 if not got and not moved and not journal.unconfirmed() else 0
            return engine.counters.rx_packets - before

        runs: dict[str, Callable[[], int]] = {
            "bare_c": lambda: lib.udrv_tapfwd_bare(fd, fd, 0, st),
            "bare_py": lambda: _bare_py(fd),
            "udrv": lambda: udrv(False),
        }
        if not res.ring_reads_tap:
            runs["udrv_cread"] = lambda: udrv(True)
        cases = list(runs)
        fbytes = ffi.from_buffer(frame)
        short = 0
        for i in range(rounds + 1):                   # round 0: warm-up, not recorded
            order = cases[i % len(cases):] + cases[:i % len(cases)]
            for case in order:
                _read_all(fd)
                queued = lib.udrv_tapfwd_inject(sock.fileno(), fbytes, len(frame), frames)
                t0 = time.process_time()
                moved = runs[case]()
                dt = time.process_time() - t0
                if moved <= 0 or dt <= 0:
                    raise UdrvError(f"tap bench: {case} forwarded nothing ({queued} frames sent on {tap.name})")
                short += moved < frames
                if i:
                    res.pps.setdefault(case, []).append(moved / dt)
                    res.injected.append(moved)
        d = rig.fake.state
        if d.rx_missed or d.bad:
            res.notes.append(f"the stub dropped {d.rx_missed} looped frames (RX ring full) and refused {d.bad} "
                             "descriptors: udrv's rate counts only frames written to the TAP")
        tap_write_errors = engine.counters.tx_errors.get("tap_write", 0)
        if tap_write_errors or st.write_errors:
            res.notes.append(f"writes to the TAP failed: udrv {tap_write_errors}, bare C {st.write_errors}")
        if nic.counters.tx_dropped:
            res.notes.append(f"udrv dropped at enqueue: {dict(nic.counters.tx_dropped)}")
        if short:
            res.notes.append(f"{short} runs forwarded fewer frames than were sent (the kernel dropped some before "
                             "the TAP queue): rates count what was forwarded")
        res.notes.append("fairness: the bare loops do one read() and one write() per frame and nothing else; udrv "
                         "does the same two syscalls plus the journal, both rings and the stub's copy (TX buffer -> "
                         "RX buffer: a real NIC's DMA, not host CPU)"
                         + ("" if res.ring_reads_tap else "; its TAP read is Python's in today's daemon (the "
                            "'daemon's loop' row), which is most of the difference to the 'TAP read in C' row"))
    finally:
        if rig is not None:
            rig.close()
        if sock is not None:
            sock.close()
        if tap is not None:
            tap.close()
    return res


# --- 3. guard overhead on the e1000 datapath ---------------------------------------------------------
@dataclass
class E1000GuardOverhead(GuardOverhead):
    impl: str = "E1000Native (C ring)"

    def setup(self) -> str:
        return (f"guard overhead, e1000 driver ({self.impl}) with the device side stubbed in C (TX looped back "
                f"into RX; see `udrv bench ring`), RX frames written from C to /dev/null, {self.frames} frames of "
                f"{self.size} B TX + RX per round, {len(self.on_fps)} interleaved rounds; Nic.enqueue (batches of 32)"
                f" + Nic.xmit/Nic.poll, no watchdog thread (as the pegasus bench); one NIC, its guard switched on and "
                f"off (Guard.enabled) every {SEGMENT} frames inside each round")


SEGMENT = 1024     # guard bench: frames per on/off segment (segments alternate inside a round)


def _guard_segment(rig: Rig, frames: int, size: int) -> tuple[int, float]:
    """(frames moved TX + RX, CPU seconds) for `frames` sent in batches of 32 and looped back."""
    nic, journal = rig.nic, rig.nic.journal
    frame = bench_frame(size, dst=nic.mac)
    batch = [frame] * 32
    engine = nic.engine
    before = engine.counters.rx_packets
    t0 = time.process_time()
    sent = 0
    while sent < frames:
        nic.enqueue(batch)
        sent += len(batch)
        while journal.unconfirmed():
            nic.xmit()
            nic.poll(0.0)
    dt = time.process_time() - t0
    got = engine.counters.rx_packets - before
    if got != sent:
        raise UdrvError(f"guard bench: {sent} frames sent, {got} came back")
    return sent + got, dt


def _guard_round(rig: Rig, frames: int, size: int, first: bool) -> tuple[float, float]:
    """(frames/s guards on, frames/s guards off): segments of SEGMENT frames alternate between
    the two (which goes first alternates too), so drift on a shared machine hits both alike."""
    guard = rig.nic.guard
    moved = {True: 0, False: 0}
    cpu = {True: 0.0, False: 0.0}
    segments = max(1, frames // SEGMENT)
    for k in range(segments):
        for g in ((first, not first) if k % 2 == 0 else (not first, first)):
            guard.enabled = g
            n, dt = _guard_segment(rig, max(32, frames // segments), size)
            moved[g] += n
            cpu[g] += dt
    guard.enabled = True
    return moved[True] / cpu[True], moved[False] / cpu[False]


def guard_overhead_e1000(frames: int = 20000, rounds: int = 7, size: int = 64) -> E1000GuardOverhead:
    from ..drivers.e1000 import E1000
    E1000Native = E1000.c_variant()
    _native()
    res = E1000GuardOverhead(frames, size)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)   # readable: a ring reading its "TAP" finds it empty
    rig = None
    try:
        # one NIC, its guard switched on and off between rounds (Guard.enabled, what
        # NicOptions.guards sets): both sides run on the same memory and the same rings
        rig = Rig(E1000Native, FdSink(null).write, loop=True, guards=True)
        guard = rig.nic.guard
        calls = [0]
        inner = guard.datapath

        def counting(*a: Any) -> int:
            calls[0] += 1
            return inner(*a)
        guard.datapath = counting            # warm-up, and count guarded calls per frame
        warm = 2016
        _guard_segment(rig, warm, size)
        del guard.datapath
        res.calls_per_frame = calls[0] / (2 * warm)
        guard.enabled = False
        _guard_segment(rig, warm, size)
        guard.enabled = True
        res.guard_ns = _guard_call_ns()
        for i in range(rounds):
            on, off = _guard_round(rig, frames, size, first=i % 2 == 0)
            res.on_fps.append(on)
            res.off_fps.append(off)
    finally:
        if rig is not None:
            rig.close()
        os.close(null)
    return res
