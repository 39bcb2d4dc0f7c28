"""One NIC at run time: a driver, its transport, its datapath, its guard, journal and logs.

`Nic` is what the supervisor drives. Every driver call goes through the guard; every
configuration the host makes goes into the config log; every TX frame goes through the
journal. When in-process recovery escalates, `restart()` does what the process-level
supervisor will later do in a fresh worker: a new driver instance on the same device,
probe, replay of the config log, re-issue of the journal.

Offloads: what the driver declares (`offloads`, udrv.offload names; a chip may narrow its
class's set) is what the Nic asks the TAP for, once, before the first datapath exists. TAP
frames then carry a virtio-net header; `enqueue` keeps it in the journal with the frames that
need work (checksum, TSO) and drops it from those that do not. A datapath that knows the
header (`handles_vnet`) does the work in hardware or falls back to udrv.offload's software;
for any other datapath `enqueue` finishes the frames in software before journaling them.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .actions import ActionList
from .configlog import ConfigLog
from .datapath import DatapathCounters
from .driver import LinkState, RxMode
from .errors import DeviceGone, Escalation, TransferTimeout, TxHang, UdrvError
from .faults import FaultInjector, FaultSpec
from .guard import Guard, Recovery, Watchdog, driver_side
from .journal import AQM_INTERVAL, AQM_TARGET, SLOT_HEADER, JournalFull, TxJournal
from .driver import NetDriver
from . import offload

log = logging.getLogger("udrv.nic")
_CSUM_FIELDS = struct.Struct("<HH")       # virtio-net header: csum_start, csum_offset at byte 6
_GSO_FIELDS = struct.Struct("<HH")        # virtio-net header: gso_size, csum_start at byte 4


@dataclass
class NicOptions:
    n_rx: int | None = None          # transfers / descriptors in flight; None = the driver's default
    n_tx: int | None = None
    guards: bool = True
    # wall-clock budgets: generous, because a starved machine (a loaded CI box, a TCG guest)
    # must not turn slowness into spurious recoveries; real hangs are far longer
    config_deadline: float = 1.0
    datapath_deadline: float = 1.0
    tx_timeout: float = 0.5          # unconfirmed TX older than this = TX hang (Xen's detector)
    journal_slots: int = 1024
    gso_journal_slots: int = 256     # with TSO a slot holds a 64 KiB frame: fewer of them
    recovery: str = "checkpoint"     # "checkpoint" (FGFT) or "restart" (close, re-probe, re-open)
    swap_after: int = 3              # escalations of one implementation before swapping to the next
    # CoDel on the TX journal (udrv/journal.py): the queue a TAP cannot push back on. target 0 =
    # off; UDRV_AQM=off / UDRV_AQM=drop (no ECN marks) in the environment override these.
    aqm_target: float = AQM_TARGET
    aqm_interval: float = AQM_INTERVAL
    aqm_ecn: bool = True


@dataclass
class NicCounters:
    tap_frames_in: int = 0
    tx_dropped: dict[str, int] = field(default_factory=dict)
    recoveries: int = 0
    escalations: int = 0
    restarts: int = 0
    restart_failures: int = 0
    swaps: int = 0
    tx_waits_for_carrier: int = 0    # hang looks that found the link down (after its one restore)

    offload_frames: int = 0          # TAP frames that asked for checksum/TSO work
    software_frames: int = 0         # of those, finished in software at enqueue

    def tx_drop(self, reason: str) -> None:
        self.tx_dropped[reason] = self.tx_dropped.get(reason, 0) + 1


def _tap_of(sink: Any) -> Any:
    """The TAP behind a sink that is a Tap's bound `write` (what the daemon passes)."""
    owner = getattr(sink, "__self__", None)
    return owner if owner is not None and hasattr(owner, "set_offloads") else None


class Nic:
    def __init__(self, driver_cls: type[NetDriver] | Sequence[type[NetDriver]], transport: Any,
                 sink: Callable[[bytes], None],
                 options: NicOptions | None = None, *, watchdog: Watchdog | None = None,
                 injector: FaultInjector | None = None,
                 on_recovery: Callable[[Recovery], None] | None = None,
                 reopen: Callable[[], Any] | None = None, tap: Any = None):
        # design diversity (nDriver): several implementations of one driver, best first; after
        # `swap_after` escalations of one, the next takes over at the next restart
        self.implementations = list(driver_cls) if isinstance(driver_cls, (list, tuple)) else [driver_cls]
        self.driver_cls = self.implementations[0]
        self._impl_escalations = 0
        self.transport = transport
        self.sink = sink
        self.opts = options or NicOptions()
        self.watchdog = watchdog
        self.injector = injector or FaultInjector()
        self.on_recovery_cb = on_recovery or (lambda r: None)
        self.reopen = reopen
        # offloads: what the implementations declare (narrowed by the first driver instance in
        # _make_driver); the TAP is the one behind the sink unless given
        self.offloads: frozenset[str] = frozenset().union(
            *(getattr(c, "offloads", frozenset()) for c in self.implementations)) & offload.KNOWN
        self.tap = tap if tap is not None else _tap_of(sink)
        self.vnet_hdr_len = 0             # bytes of virtio-net header in front of each TAP frame
        self._tap_configured = False
        # a slot holds the largest frame the driver can send: MTU + header + VLAN tag, 64-byte
        # aligned; with TSO a 64 KiB GSO frame (+ link headers) behind its virtio-net header
        slot = max(c.max_mtu for c in self.implementations) + 18 + SLOT_HEADER
        nslots = self.opts.journal_slots
        if self.offloads:
            slot += offload.VNET_HDR_LEN
        if self.offloads & {offload.TSO4, offload.TSO6}:
            slot = max(slot, 65536 + 64 + offload.VNET_HDR_LEN + SLOT_HEADER)
            nslots = min(nslots, self.opts.gso_journal_slots)
        self.journal = TxJournal(nslots, max((slot + 63) & ~63, 2048))
        self._set_aqm()
        self.config_log = ConfigLog()
        self.counters = NicCounters()
        self.recoveries: list[Recovery] = []
        self.link = LinkState(False)
        self.state = "new"            # new | up | down | failed
        self.last_error = ""
        self._awaiting_traffic: list[tuple[Recovery, float]] = []
        self._last_tx_progress = time.monotonic()
        self._tx_tail_seen = 0            # the journal's confirmed count at the last progress check
        self._tx_hangs = 0                # hang recoveries since TX last moved
        self._tx_done_seen = 0.0          # the ring's last OUT completion at the last look (tx_clock)
        self._restored_for_link = False   # a hang with the link down restored the device already
        self._past_counts = DatapathCounters()   # what engines before this one counted
        self._transport_dead = False
        self.transport_generation = 0     # bumps when the transport is replaced (poll fds change)
        self._make_driver()

    # --- construction ------------------------------------------------------------------------
    def _make_driver(self) -> None:
        self.actions = ActionList()
        self.driver = self.driver_cls(self.transport, self.actions)
        if not self._tap_configured:
            self._setup_tap()
        n_rx, n_tx = getattr(self.driver_cls, "default_rings", (4, 8))
        self.engine = self.driver.make_datapath(self.journal, self.sink, self.opts.n_rx or n_rx,
                                                self.opts.n_tx or n_tx, self._progress)
        watch = getattr(self.engine, "watch_tx", None)
        if watch is not None:
            watch(self.opts.tx_timeout)
        if getattr(self.engine, "owns_tap", False) and hasattr(self.engine, "tap_enqueue"):
            # a ring that reads the TAP in C hands back the frames only Python can judge
            self.engine.tap_enqueue = self.enqueue
        self.guard = Guard(self.driver, self.injector, on_recovery=self._on_recovery,
                           reset_datapath=self._reset_datapath, sync_datapath=self._sync_datapath,
                           config_deadline=self.opts.config_deadline,
                           datapath_deadline=self.opts.datapath_deadline,
                           enabled=self.opts.guards, watchdog=self.watchdog,
                           retry=self.opts.recovery == "checkpoint", device_writes=self._device_writes)

    def _device_writes(self) -> object:
        """The transport's count of state-changing requests (None where it keeps none), with the
        transport's identity: a reopened device starts counting again."""
        t = self.transport
        n = getattr(t, "device_writes", None)
        return None if n is None else (id(t), n)

    def _set_aqm(self) -> None:
        """NicOptions, unless UDRV_AQM says otherwise: off, drop (no ECN marks), on, or TARGET/
        INTERVAL in ms (e.g. 1/10), for benches and A/B runs."""
        target, interval, ecn = self.opts.aqm_target, self.opts.aqm_interval, self.opts.aqm_ecn
        mode = os.environ.get("UDRV_AQM", "").strip().lower()
        if mode in ("off", "0", "none"):
            target = 0.0
        elif mode == "drop":
            ecn = False
        elif "/" in mode:
            try:
                target, interval = (float(x) / 1e3 for x in mode.split("/"))
            except ValueError:
                log.warning("event=aqm_setting_ignored UDRV_AQM=%r (TARGET/INTERVAL in ms, e.g. 1/10)", mode)
        elif mode not in ("", "on", "1", "ecn"):
            log.warning("event=aqm_setting_ignored UDRV_AQM=%r (use off, drop, on or TARGET/INTERVAL in ms)", mode)
        self.set_aqm(target, interval, ecn)

    def set_aqm(self, target: float, interval: float, ecn: bool) -> dict[str, Any]:
        """CoDel's settings on the TX journal, live (the datapaths read them from the journal's
        header at every entry; the header is their one copy): target 0 turns it off. Returns
        what is in effect."""
        self.journal.set_aqm(target, interval, ecn)
        log.info("event=aqm target_ms=%g interval_ms=%g ecn=%s", target * 1e3, interval * 1e3, ecn)
        return self.aqm_settings()

    def aqm_settings(self) -> dict[str, Any]:
        j = self.journal
        return {"target_ms": j.aqm_target * 1e3, "interval_ms": j.aqm_interval * 1e3, "ecn": j.aqm_ecn}

    def _setup_tap(self) -> None:
        """Once, before the first datapath is built (the C ring takes the TAP's fd and header
        size at construction): a chip may support less than its class declares."""
        self._tap_configured = True
        narrowed = getattr(self.driver, "offloads", None)
        if narrowed is not None:
            self.offloads &= frozenset(narrowed)
        # UDRV_OFFLOADS=none (or e.g. "csum"): what an operator allows, for debugging and benches
        allowed = os.environ.get("UDRV_OFFLOADS")
        if allowed is not None:
            self.offloads &= frozenset(a.strip() for a in allowed.split(",") if a.strip() not in ("", "none"))
        if self.tap is None:
            return
        set_offloads = getattr(self.tap, "set_offloads", None)
        if set_offloads is not None:
            # a driver that coalesces RX into GSO super-frames needs the header without offloads
            if getattr(self.driver, "rx_vnet_hdr", False):
                set_offloads(self.offloads, vnet_hdr=True)
            else:
                set_offloads(self.offloads)
        self.vnet_hdr_len = getattr(self.tap, "vnet_hdr_len", 0)
        if self.vnet_hdr_len:
            log.info("event=offloads tap=%s offloads=%s vnet_hdr=%d", getattr(self.tap, "name", "?"),
                     ",".join(sorted(self.offloads)) or "none", self.vnet_hdr_len)

    def _reset_datapath(self, fault: BaseException) -> tuple[int, str]:
        """After a datapath fault and the device's restore: (TX entries re-issued, what happened
        to the transfers in flight).
        A datapath whose state the driver cannot tear (the C ring: it changes only inside its own
        calls) keeps its transfers after a fault of the driver's own when nothing reset the
        device's endpoints; everything else is recycled — without clearing halts after a timeout,
        which leaves none (Linux usbnet's tx_timeout likewise only unlinks)."""
        resume = getattr(self.engine, "resume", None)
        if driver_side(fault) and resume is not None and resume():
            return 0, "in-flight transfers kept"
        recycle = getattr(self.engine, "recycle", None)
        if recycle is not None:
            return recycle(clear_halts=not isinstance(fault, TransferTimeout))
        return self.engine.reset(), "in-flight transfers recycled"

    def _sync_datapath(self) -> None:
        """After a restore: transfers in flight iff the restored driver is open."""
        if self.driver.soft.opened:
            self.engine.stop()
            self.engine.start()
        else:
            self.engine.stop()

    # --- bring-up ------------------------------------------------------------------------------
    def bring_up(self) -> None:
        """Claim, probe (both as transactions) and take the first checkpoint."""
        self.guard.config("bind")
        self.guard.config("probe")
        self.guard.take_checkpoint()
        self.state = "up"

    @property
    def mac(self) -> bytes:
        return self.driver.mac

    # --- configuration (logged, guarded) ---------------------------------------------------
    def configure(self, entry: str, *args: Any) -> Any:
        """Run a configuration entry point; escalations trigger a restart. Returns its result."""
        try:
            result = self.guard.config(entry, *args)
        except Escalation as e:
            self._restart_after(e)
            # the host's wish is not applied: it is not logged, the old config stays
            raise UdrvError(f"{entry}{args!r} failed twice and was rolled back: {e.fault}") from None
        if entry not in ("link_check", "bind", "probe"):
            if entry == "stop":
                self.config_log.forget("open")
            else:
                self.config_log.record(entry, *args)
        return result

    def open(self) -> None:
        self.configure("open")

    def set_mac(self, mac: bytes) -> None:
        self.configure("set_mac", mac)

    def set_mtu(self, mtu: int) -> None:
        self.configure("set_mtu", mtu)

    def set_rx_mode(self, mode: RxMode) -> None:
        self.configure("set_rx_mode", mode)

    def link_check(self) -> LinkState:
        self.link = self.configure("link_check")
        return self.link

    # --- datapath ------------------------------------------------------------------------------
    def enqueue(self, frames: list[bytes], vnet_hdr_len: int | None = None) -> int:
        """Frames from the TAP into the journal (the driver sees them only from there). With a
        virtio-net header (vnet_hdr_len, default: what the TAP was set up with) each frame
        starts with one; frames that ask for work keep it in the journal."""
        hlen = self.vnet_hdr_len if vnet_hdr_len is None else vnet_hdr_len
        if hlen:
            return self._enqueue_vnet(frames, hlen)
        accepted = 0
        mtu_max = self.driver.soft.mtu + 14 + 4     # + Ethernet header + a VLAN tag
        for f in frames:
            self.counters.tap_frames_in += 1
            if len(f) > mtu_max:
                self.counters.tx_drop("oversize")
                continue
            try:
                self.journal.append(f)
                accepted += 1
            except JournalFull:
                self.counters.tx_drop("journal_full")
            except ValueError:          # larger than a journal slot
                self.counters.tx_drop("oversize")
        return accepted

    def _enqueue_vnet(self, frames: list[bytes], hlen: int) -> int:
        accepted = 0
        mtu_max = self.driver.soft.mtu + 14 + 4
        in_hw = getattr(self.engine, "handles_vnet", False)
        append, counters = self.journal.append, self.counters
        for raw in frames:
            counters.tap_frames_in += 1
            if len(raw) < hlen:
                counters.tx_drop("short_vnet_header")
                continue
            f = memoryview(raw)[hlen:]          # no copy: the journal copies it once
            flags, gso = raw[0], raw[1]
            keep = b""
            out: list[Any] = [f]
            if gso == offload.GSO_NONE:
                # the common cases, without building a plan: nothing to do / a checksum to fill
                if len(f) > mtu_max:
                    counters.tx_drop("oversize")
                    continue
                if flags & offload.F_NEEDS_CSUM:
                    start, offset = _CSUM_FIELDS.unpack_from(raw, 6)
                    if start >= len(f) or start + offset + 2 > len(f):
                        counters.tx_drop("bad_offload_request")
                        continue
                    counters.offload_frames += 1
                    if in_hw:
                        keep = raw[:hlen]
                    else:
                        counters.software_frames += 1
                        out = offload.resolve(offload.VnetHdr.parse(raw), f)
            elif in_hw and gso in (offload.GSO_TCPV4, offload.GSO_TCPV6) and flags & offload.F_NEEDS_CSUM:
                # TCP GSO for a datapath that reads the header itself (and checks it as it
                # plans the packet): here only what reaches the wire must fit the MTU, each
                # segment = headers through the TCP data offset + gso_size
                size, start = _GSO_FIELDS.unpack_from(raw, 4)
                if start + 13 > len(f) or start + (f[start + 12] >> 4) * 4 + size > mtu_max:
                    counters.tx_drop("oversize" if start + 13 <= len(f) else "bad_offload_request")
                    continue
                counters.offload_frames += 1
                keep = raw[:hlen]
            else:
                try:
                    hdr = offload.VnetHdr.parse(raw)
                    p = offload.plan(hdr, f)
                except offload.OffloadError:
                    counters.tx_drop("bad_offload_request")
                    continue
                counters.offload_frames += 1
                # what reaches the wire must fit the MTU: each segment of the GSO frame
                if p is None or p.hdr_len + p.mss > mtu_max:
                    counters.tx_drop("oversize")
                    continue
                if in_hw:
                    keep = raw[:hlen]
                else:
                    counters.software_frames += 1
                    out = offload.resolve(hdr, f)
            if self.journal.space() < len(out):
                counters.tx_drop("journal_full")
                continue
            try:
                for piece in out:
                    append(piece, keep)
                accepted += 1
            except ValueError:
                counters.tx_drop("oversize")
        return accepted

    def xmit(self) -> int:
        idle = self.journal.in_device() == 0
        try:
            n = self.guard.datapath("xmit", self.engine.xmit)
            if idle and n:
                self._last_tx_progress = time.monotonic()   # the hang clock starts now
            return n
        except Escalation as e:
            self._restart_after(e)
            return 0

    def poll(self, timeout: float = 0.0) -> int:
        try:
            return self.guard.datapath("poll", self.engine.poll, timeout)
        except Escalation as e:
            self._restart_after(e)
            return 0

    def runs_in_c(self) -> bool:
        """The datapath can run turns in a C loop (`run`): it reads the TAP itself, has run() and
        (`can_run`, where it depends on the transport) can use it here."""
        e = self.engine
        return getattr(e, "owns_tap", False) and callable(getattr(e, "run", None)) and getattr(e, "can_run", True)

    def keeps_tx_clock(self) -> bool:
        """The datapath keeps the TX hang clock itself (tx_clock) and its C loop comes back when
        TX stalls: check_tx_progress is then due at every turn, not on a timer."""
        return callable(getattr(self.engine, "tx_clock", None))

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Datapath turns in the engine's C loop for up to timeout seconds, back early when
        Python is needed or wake_fd is readable. Guarded as the "poll" entry point: it does
        what poll() does, only without a Python round trip per turn."""
        try:
            return self.guard.datapath("poll", self.engine.run, timeout, wake_fd)
        except Escalation as e:
            self._restart_after(e)
            return 0

    def check_tx_progress(self, now: float | None = None) -> bool:
        """Xen's hang detector: frames in the device but no TX completion for tx_timeout. Only
        confirmed TX counts as progress (frames received say nothing about the OUT side). A hang
        is the device's (TxHang): it is restored and its OUT transfers recycled; a second hang
        with no TX completion since the first recovery restarts the driver."""
        now = time.monotonic() if now is None else now
        clock = getattr(self.engine, "tx_clock", None)
        if clock is not None:
            return self._check_tx_clock(now, *clock())
        if self._tx_moved(now) or self.journal.in_device() == 0:
            self._last_tx_progress, self._tx_hangs = now, 0
            return True
        if now - self._last_tx_progress <= self.opts.tx_timeout:
            return True
        self._last_tx_progress = now
        return self._tx_hang(f"{self.journal.in_device()} frames unconfirmed for > {self.opts.tx_timeout}s: "
                             "the device takes no frames")

    def _link_down(self) -> bool:
        """Asked when a hang is suspected: True if the device says its link is down (False
        also when it cannot tell: a device that cannot answer is hung)."""
        try:
            return not self.link_check().up
        except UdrvError:
            return False

    def _tx_hang(self, what: str) -> bool:
        """Recover from a TX hang (the device's: restore + OUT recycle); the second one with
        nothing confirmed in between restarts the driver. Returns False (no progress).

        With the link down a device takes no frames, and that alone is no hang (the kernel's
        netdev watchdog does not run without carrier either); but a device that lost its state
        may have lost its link with it (an e1000 after a reset behind our back), so it is
        restored once per link-down spell, never restarted, and after that the frames wait for
        the link: True, the hang clock starts again."""
        if self._link_down():
            if self._restored_for_link:
                self.counters.tx_waits_for_carrier += 1
                restart = getattr(self.engine, "restart_tx_clock", None)
                if restart is not None:
                    restart()
                self._last_tx_progress = time.monotonic()
                return True
            self._restored_for_link = True
            what += "; the link is down: restored once, then the frames wait for it"
            again = ""
        else:
            if self.state != "up":        # the link check itself failed and restarted the driver
                return False
            self._restored_for_link = False
            self._tx_hangs += 1
            again = (f"TX still hung after {self._tx_hangs - 1} recovery: nothing confirmed since"
                     if self._tx_hangs > 1 else "")
        try:
            self.guard.recover_datapath("xmit", TxHang(what), escalate=again)
        except Escalation as e:
            self._tx_hangs = 0
            self._restart_after(e)
        return False

    def _check_tx_clock(self, now: float, done_at: float, waiting_since: float | None) -> bool:
        """check_tx_progress for a ring that keeps the hang clock itself (tx_clock): a hang is OUT
        transfers that have waited longer than tx_timeout with none completing; only a
        completion since the last hang counts as TX moving again."""
        if done_at > self._tx_done_seen:
            self._tx_done_seen, self._tx_hangs, self._restored_for_link = done_at, 0, False
        if waiting_since is None or now - waiting_since <= self.opts.tx_timeout:
            return True
        return self._tx_hang(f"{self.journal.in_device()} frames unconfirmed, OUT transfers waiting "
                             f"{now - waiting_since:.2f}s (> {self.opts.tx_timeout}s): the device takes no frames")

    def _tx_moved(self, now: float) -> bool:
        """TX confirmed since the last look: the hang clock starts again at `now`."""
        tail = self.journal.tail
        if tail == self._tx_tail_seen:
            return False
        self._tx_tail_seen, self._last_tx_progress, self._tx_hangs = tail, now, 0
        self._restored_for_link = False
        return True

    def _progress(self) -> None:
        self._tx_moved(time.monotonic())
        if self._awaiting_traffic:
            now = time.monotonic()
            for rec, t0 in self._awaiting_traffic:
                rec.silent_ms = (now - t0) * 1000
                log.info("%s", rec.line())
            self._awaiting_traffic.clear()

    def _on_recovery(self, rec: Recovery) -> None:
        self.counters.recoveries += 1
        self.recoveries.append(rec)
        del self.recoveries[:-100]
        self.last_error = f"{rec.entry}: {rec.fault}: {rec.detail}"
        if rec.entry in ("xmit", "poll") or rec.outcome == "escalated":
            self._awaiting_traffic.append((rec, rec._t0))
        self.on_recovery_cb(rec)

    # --- process-level style recovery -------------------------------------------------------------
    def _restart_after(self, e: Escalation) -> None:
        log.warning("escalation: %s; restarting the driver", e.fault)
        self.counters.escalations += 1
        self._impl_escalations += 1
        i = self.implementations.index(self.driver_cls)
        if self._impl_escalations >= self.opts.swap_after and i + 1 < len(self.implementations):
            new = self.implementations[i + 1]
            log.warning("event=swap from=%s to=%s after=%d escalations", self.driver_cls.__name__,
                        new.__name__, self._impl_escalations)
            self.driver_cls = new
            self._impl_escalations = 0
            self.counters.swaps += 1
        if e.fault.kind == "disconnect" and "injected" not in e.fault.detail:
            self._transport_dead = True
        last = self.recoveries[-1] if self.recoveries else None     # before the restart adds any
        try:
            ms = self.restart()
            if last is not None and last.outcome == "escalated" and last.restart_ms is None:
                last.restart_ms = ms       # what the escalation cost in all: recovery_ms + this
        except UdrvError as err:
            self.counters.restart_failures += 1
            self.state = "down"
            self.last_error = str(err)
            log.error("restart failed: %s (will retry)", err)

    def restart(self) -> float:
        """Full restart: fresh driver on the device, probe, replay config, re-issue journal."""
        t0 = time.monotonic()
        self.counters.restarts += 1
        try:
            self.engine.stop()
        except Exception:
            pass
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self._absorb_counts()
        self.actions.release_all()
        if self.reopen is not None and self._transport_dead:
            # a replugged USB device is a new device (new address, new handle): open it again
            try:
                self.transport.close()
            except Exception:
                pass
            self.transport = self.reopen()      # raises DeviceNotFound while still unplugged
            self._transport_dead = False
            self.transport_generation += 1
        self._make_driver()
        try:
            self.guard.config("bind")
            self.guard.config("probe")
            self.guard.take_checkpoint()
            for call in self.config_log.calls():
                self.guard.config(call.entry, *call.args)
        except (Escalation, DeviceGone) as e:
            gone = isinstance(e, DeviceGone) or (isinstance(e, Escalation) and e.fault.kind == "disconnect")
            self._transport_dead = self._transport_dead or gone
            raise UdrvError(f"the device did not come back after a restart: {e}") from None
        self.journal.rewind()
        self.engine.xmit()
        self.state = "up"
        return (time.monotonic() - t0) * 1000

    # --- fault injection and status ------------------------------------------------------------
    def inject(self, entry: str, kind: str, count: int = 1) -> None:
        known = set(self.driver.CONFIG_ENTRIES) | set(self.driver.DATAPATH_ENTRIES)
        if entry not in known:
            raise UdrvError(f"{entry!r} is not an entry point of {self.driver.name}: "
                            f"use one of {', '.join(sorted(known))}")
        if kind == "corrupt" and entry in self.driver.DATAPATH_ENTRIES:
            raise UdrvError("'corrupt' needs a configuration entry point (datapath calls check no invariants)")
        self.injector.arm(FaultSpec(entry, kind, count))

    def _tap_totals(self) -> tuple[int, int, dict[str, int]]:
        """(TAP frames in, offload requests, TX drops by reason): Nic.enqueue's counts plus what
        a ring that reads the TAP in C counted (tap_stats())."""
        frames, offl, drops = self.counters.tap_frames_in, self.counters.offload_frames, dict(self.counters.tx_dropped)
        tap_stats = getattr(self.engine, "tap_stats", None)
        if tap_stats is not None:
            t = tap_stats()
            frames += t["tap_frames_in"]
            offl += t["offload_frames"]
            for k, v in t["tx_dropped"].items():
                drops[k] = drops.get(k, 0) + v
        return frames, offl, drops

    def _absorb_counts(self) -> None:
        """The engine is going away: keep what it counted (the interface's counters survive a
        restart, as a kernel netdev's survive a reset)."""
        if not getattr(self.engine, "_counts_absorbed", False):
            self._past_counts = self._past_counts + self.engine.counters
            self.engine._counts_absorbed = True
        tap_stats = getattr(self.engine, "tap_stats", None)
        if tap_stats is None or getattr(self.engine, "_tap_absorbed", False):
            return
        t = tap_stats()
        self.counters.tap_frames_in += t["tap_frames_in"]
        self.counters.offload_frames += t["offload_frames"]
        for k, v in t["tx_dropped"].items():
            self.counters.tx_dropped[k] = self.counters.tx_dropped.get(k, 0) + v
        self.engine._tap_absorbed = True
        self.engine.tap_stats = None

    def status(self) -> dict[str, Any]:
        c = self._past_counts + self.engine.counters
        st = self.driver.stats()
        rx_drop = dict(c.rx_dropped)
        tap_in, offload_frames, tx_dropped = self._tap_totals()
        self.journal.sync()          # a C ring moves the indices without telling the Python mirrors
        if self.journal.aqm_drops:
            tx_dropped = {**tx_dropped, "aqm": self.journal.aqm_drops}
        return {
            "driver": self.driver.name,
            "device": getattr(self.transport.info, "ident", "") or getattr(self.transport.info, "bdf", ""),
            "state": self.state,
            "mac": ":".join(f"{b:02x}" for b in self.driver.mac),
            "mtu": self.driver.soft.mtu,
            "rx_mode": {"promisc": self.driver.soft.mode.promisc, "allmulti": self.driver.soft.mode.allmulti,
                        "multicast": [m.hex() for m in self.driver.soft.mode.multicast]},
            "link": {"up": self.link.up, "speed": self.link.speed, "full_duplex": self.link.full_duplex},
            "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
            "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes,
            "rx_errors": sum(rx_drop.values()) + st.rx_errors,
            "tx_errors": sum(c.tx_errors.values()) + st.tx_errors,
            "rx_dropped": rx_drop, "rx_missed": st.rx_missed,
            "tx_dropped": tx_dropped, "tap_frames_in": tap_in, "offload_frames": offload_frames,
            "tx_device_errors": dict(c.tx_errors),
            # queued: read from the TAP, not yet in the device (the latency a bulk flow adds)
            "tx_journal": {"unconfirmed": self.journal.unconfirmed(), "in_device": self.journal.in_device(),
                           "queued": self.journal.unsent(), "queued_bytes": self.journal.unsent_bytes(),
                           "oldest_waiting_ms": round(self.journal.oldest_unsent_age() * 1e3, 3),
                           "reissued": self.journal.reissued,
                           # CoDel on that queue: frames dropped / ECN-marked for waiting too long
                           **{f"aqm_{k}": v for k, v in self.aqm_settings().items()},
                           "aqm_drops": self.journal.aqm_drops, "aqm_marks": self.journal.aqm_marks},
            "recoveries": self.counters.recoveries, "escalations": self.counters.escalations,
            "restarts": self.counters.restarts, "swaps": self.counters.swaps,
            "tx_waits_for_carrier": self.counters.tx_waits_for_carrier,
            "implementation": self.driver_cls.__name__,
            "last_fault": self.last_error,
            "last_recovery": self.recoveries[-1].as_dict() if self.recoveries else None,
            "driver_stats": st.extra,
            # a USB C ring with its TX half on a thread of its own (None: no such ring)
            "tx_thread": getattr(self.engine, "tx_thread", None),
            # a datapath whose whole turn loops in C (the e1000 ring on VFIO): its turns and sleeps
            "c_loop": self.engine.loop_counts() if hasattr(self.engine, "loop_counts") and self.runs_in_c() else None,
            # TX wire frames cut in software from TSO frames, when the datapath does that
            "tx_segments": (getattr(self.engine, "tap_stats", None) or (lambda: {}))().get("tx_segments"),
            # RX coalescing (GRO in the driver), when the datapath does it
            "rx_coalesce": (self.engine.rx_coalesce_counts()
                            if hasattr(self.engine, "rx_coalesce_counts") else None),
        }

    def close(self) -> None:
        try:
            if self.driver.soft.opened:
                self.guard.enabled = False
                self.driver.stop()
        except Exception:
            pass
        try:
            self.engine.stop()
        except Exception:
            pass
        self.actions.release_all()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self.journal.close()
