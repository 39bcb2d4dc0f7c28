"""One NIC at run time: what outlives a driver instance, around the driver domain that does not.

`Nic` is what the daemon drives. It composes:
  * the TX journal and `TxAdmission` (udrv/admission.py): the host's frames into the journal;
  * a `DriverDomain` (udrv/domain.py): driver + datapath + guard, replaced whole by a restart;
  * the config log: every configuration the host made, replayed onto a fresh domain;
  * `TxHangWatch` (udrv/hangwatch.py): frames in the device that never complete;
  * `Implementations` (below): which implementation of the driver runs, and the swap to the
    next one after repeated escalations (design diversity, nDriver);
  * `RecoveryLog` and `CountLedger` (udrv/nicstatus.py): what the user sees.
When in-process recovery escalates, `restart()` does what the process-level supervisor does
in a fresh worker: a new domain on the same device, probe, replay, re-issue of the journal.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from . import offload
from .actions import ActionList
from .admission import (AdmissionCounts, ReadableTap, TxAdmission, codel_settings, journal_geometry,
                        negotiate_offloads, tap_of)
from .configlog import ConfigLog, LoggedCall
from .datapath import Datapath, TapCounts
from .domain import DriverDomain
from .driver import LinkState, NetDriver, RxMode
from .errors import DeviceGone, Escalation, UdrvError
from .faults import FaultInjector, FaultSpec
from .guard import Guard, Recovery, Watchdog
from .hangwatch import HangCounts, TxHangWatch
from .journal import AQM_INTERVAL, AQM_TARGET, TxJournal
from .nicstatus import CountLedger, RecoveryLog

log = logging.getLogger("udrv.nic")


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
    # CoDel on the TX journal: target 0 = off; UDRV_AQM in the environment overrides these
    aqm_target: float = AQM_TARGET
    aqm_interval: float = AQM_INTERVAL
    aqm_ecn: bool = True


@runtime_checkable
class HoldsOrphans(Protocol):
    """A transport that keeps the DMA buffers of a worker that died mapped (the device may still
    reach them) until its successor's rings are programmed."""
    def release_orphans(self) -> int: ...


@dataclass(frozen=True)
class DomainState:
    """What one worker leaves its successor (pickled by the worker; opaque to the supervisor)."""
    checkpoint: Any
    soft: Any
    config: list[LoggedCall]
    link: LinkState


@dataclass(frozen=True)
class Takeover:
    """How a worker took over a device (Nic.adopt)."""
    how: str                 # restored from the checkpoint | probed and configuration replayed
    reissued: int            # TX entries the previous worker left unconfirmed, sent again
    restore_ms: float
    reissue_ms: float


class NicCounters:
    """The interface's event counts: its own, and its collaborators' by name."""

    def __init__(self, admission: AdmissionCounts, hangs: HangCounts):
        self.recoveries = 0
        self.escalations = 0
        self.restarts = 0
        self.restart_failures = 0
        self.swaps = 0
        self._admission, self._hangs = admission, hangs

    tap_frames_in = property(lambda self: self._admission.frames_in)
    tx_dropped = property(lambda self: self._admission.dropped)
    offload_frames = property(lambda self: self._admission.offload_frames)   # asked for checksum/TSO work
    software_frames = property(lambda self: self._admission.software_frames)  # of those, done in software
    tx_waits_for_carrier = property(lambda self: self._hangs.waits_for_carrier)


class Implementations:
    """The implementations of one driver, best first; after `swap_after` escalations of the one
    running, the next takes over at the next restart."""

    def __init__(self, classes: Sequence[type[NetDriver]], swap_after: int):
        self.classes = list(classes)
        self.current = self.classes[0]
        self.swap_after = swap_after
        self._escalations = 0

    def escalated(self) -> type[NetDriver] | None:
        """Count one escalation of the current implementation; returns the new one on a swap."""
        self._escalations += 1
        i = self.classes.index(self.current)
        if self._escalations < self.swap_after or i + 1 == len(self.classes):
            return None
        old, self.current, self._escalations = self.current, self.classes[i + 1], 0
        log.warning("event=swap from=%s to=%s after=%d escalations", old.__name__, self.current.__name__,
                    self.swap_after)
        return self.current


class Nic:
    def __init__(self, driver_cls: type[NetDriver] | Sequence[type[NetDriver]], transport: Any,
                 sink: Callable[[bytes], None],
                 options: NicOptions | None = None, *, watchdog: Watchdog | None = None,
                 injector: FaultInjector | None = None,
                 on_recovery: Callable[[Recovery], None] | None = None,
                 reopen: Callable[[], Any] | None = None, tap: Any = None,
                 journal: Callable[[int, int], TxJournal] | None = None,
                 on_state: Callable[[], None] | None = None,
                 on_progress: Callable[[], None] | None = None,
                 on_busy: Callable[[float | None], None] | None = None):
        """journal(nslots, slot_size) gives the TX journal (a worker's: the supervisor's memfd);
        on_state runs after every change of what a successor needs (DomainState); on_progress
        whenever frames moved; on_busy(deadline) / on_busy(None) around a restart (how long it may
        take: the worker's heartbeat must not call it a hang)."""
        classes = list(driver_cls) if isinstance(driver_cls, (list, tuple)) else [driver_cls]
        self.opts = options or NicOptions()
        self.impls = Implementations(classes, self.opts.swap_after)
        self.transport = transport
        self.sink = sink
        self.watchdog = watchdog
        self.injector = injector or FaultInjector()
        self.reopen = reopen
        self.tap = tap if tap is not None else tap_of(sink)
        # what the implementations declare, narrowed by the first driver instance (a chip may
        # support less than its class) before the first datapath exists
        self.offloads: frozenset[str] = frozenset().union(*(c.offloads for c in classes)) & offload.KNOWN
        geometry = journal_geometry(max(c.max_mtu for c in classes), self.offloads,
                                    self.opts.journal_slots, self.opts.gso_journal_slots)
        self.journal = TxJournal(*geometry) if journal is None else journal(*geometry)
        self.on_state = on_state or (lambda: None)
        self.on_progress = on_progress
        self.on_busy = on_busy or (lambda deadline: None)
        self.set_aqm(*codel_settings(self.opts.aqm_target, self.opts.aqm_interval, self.opts.aqm_ecn))
        self.admission = TxAdmission(self.journal, lambda: self.driver.soft.mtu)
        self.config_log = ConfigLog()
        self.log = RecoveryLog(on_recovery)
        self.ledger = CountLedger()
        self.hangs = TxHangWatch(self.journal, self.opts.tx_timeout, engine=lambda: self.engine,
                                 link_down=self._link_down, driver_up=lambda: self.state == "up",
                                 recover=self._recover_tx_hang)
        self.counters = NicCounters(self.admission.counts, self.hangs.counts)
        self.link = LinkState(False)
        self.state = "new"            # new | up | down | failed
        self._transport_dead = False
        self.transport_generation = 0     # bumps when the transport is replaced (poll fds change)
        self._tap_negotiated = False
        self.domain = self._make_domain()

    # --- the current domain, by its parts --------------------------------------------------------
    driver = property(lambda self: self.domain.driver)
    engine: Datapath = property(lambda self: self.domain.engine)          # type: ignore[assignment]
    guard: Guard = property(lambda self: self.domain.guard)               # type: ignore[assignment]
    actions: ActionList = property(lambda self: self.domain.actions)      # type: ignore[assignment]
    driver_cls = property(lambda self: self.impls.current)
    implementations = property(lambda self: self.impls.classes)
    recoveries = property(lambda self: self.log.records)
    vnet_hdr_len = property(lambda self: self.admission.vnet_hdr_len)

    @property
    def on_recovery_cb(self) -> Callable[[Recovery], None]:
        return self.log.on_recovery

    @on_recovery_cb.setter
    def on_recovery_cb(self, cb: Callable[[Recovery], None]) -> None:
        self.log.on_recovery = cb

    @property
    def last_error(self) -> str:
        return self.log.last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        self.log.last_error = text

    # --- construction --------------------------------------------------------------------------
    def _make_domain(self) -> DriverDomain:
        actions = ActionList()
        cls = self.impls.current
        driver = cls(self.transport, actions)
        if not self._tap_negotiated:
            # once, before the first datapath is built (the C ring takes the TAP's fd and header
            # size at construction)
            self._tap_negotiated = True
            self.offloads &= driver.offloads
            self.offloads, self.admission.vnet_hdr_len = negotiate_offloads(self.tap, self.offloads, cls.rx_vnet_hdr)
        n_rx, n_tx = cls.default_rings
        domain = DriverDomain(driver, actions, self.transport, self.journal, self.sink,
                              rings=(self.opts.n_rx or n_rx, self.opts.n_tx or n_tx), injector=self.injector,
                              watchdog=self.watchdog, on_recovery=self._on_recovery, on_progress=self._progress,
                              tx_timeout=self.opts.tx_timeout, guards=self.opts.guards,
                              retry=self.opts.recovery == "checkpoint",
                              config_deadline=self.opts.config_deadline,
                              datapath_deadline=self.opts.datapath_deadline)
        self.admission.in_hw = domain.engine.caps.handles_vnet
        # a datapath that reads the TAP itself hands back the frames only the runtime can judge
        domain.engine.set_tap_fallback(self.enqueue)
        return domain

    # --- AQM -------------------------------------------------------------------------------------
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

    # --- bring-up and configuration (logged, guarded) ------------------------------------------
    def bring_up(self) -> None:
        """Claim, probe (both as transactions) and take the first checkpoint."""
        self.domain.bring_up()
        self.state = "up"
        self.on_state()

    def state_for_successor(self) -> DomainState:
        """What a worker taking over needs: the last checkpoint, the soft state it belongs to,
        the configuration log and the link."""
        return DomainState(self.guard.checkpoint, self.guard.checkpoint_soft, self.config_log.calls(), self.link)

    def adopt(self, state: DomainState) -> Takeover:
        """Take over a device another worker drove: restore it from that worker's last checkpoint
        (a full probe and a replay of the configuration if the restore fails), then re-issue every
        TX entry it left unconfirmed. The journal is the same memory the other worker used."""
        t0 = time.monotonic()
        # this worker mapped the journal long before (a warm spare): its view of the indices is
        # as old as that; the previous worker moved them since
        self.journal.sync()
        for call in state.config:
            self.config_log.record(call.entry, *call.args)
        self.link = state.link
        how = "restored from the checkpoint"
        try:
            self.domain.adopt(state.soft, state.checkpoint)
        except Exception as e:               # the checkpoint does not take: from power-on, as a restart
            log.warning("event=adopt-restore-failed error=%s (probing and replaying the configuration)", e)
            self.domain.retire()
            self.domain = self._make_domain()
            self.domain.bring_up()
            self.domain.replay(self.config_log.calls())
            how = "probed and configuration replayed"
        if isinstance(self.transport, HoldsOrphans):
            self.transport.release_orphans()      # the rings are this worker's now: the old ones go
        t1 = time.monotonic()
        self._rescue_unfinished_read()
        self.journal.sync()
        reissued = self.journal.rewind()
        self.state = "up"
        self.engine.xmit()
        self.on_state()
        return Takeover(how, reissued, (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)

    def _rescue_unfinished_read(self) -> None:
        """A frame the dead worker had read from the TAP into the journal but not published."""
        taken, raw = self.journal.unfinished_read(self.admission.vnet_hdr_len)
        if not taken:
            return
        if raw is None:
            self.admission.counts.drop("read_by_dead_worker")
            log.warning("event=tx-frame-lost the dead worker had read a frame from the TAP whose length its "
                        "headers do not tell (not IPv4, IPv6 or ARP): it is dropped and counted")
        else:
            n = self.admission.admit([raw])
            log.info("event=tx-frame-rescued bytes=%d journaled=%d (read by the dead worker, not yet journaled)",
                     len(raw), n)

    @property
    def mac(self) -> bytes:
        return self.driver.mac

    def configure(self, entry: str, *args: Any) -> Any:
        """Run a configuration entry point; escalations trigger a restart. Returns its result."""
        try:
            result = self.domain.config(entry, *args)
        except Escalation as e:
            self._restart_after(e)
            # the host's wish is not applied: it is not logged, the old config stays
            raise UdrvError(f"{entry}{args!r} failed twice and was rolled back: {e.fault}") from None
        if entry not in ("link_check", "bind", "probe"):
            if entry == "stop":
                self.config_log.forget("open")
            else:
                self.config_log.record(entry, *args)
            self.on_state()
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
    def pull_tap(self, tap: ReadableTap, budget: int) -> int:
        """Frames waiting on the TAP into the journal (TxAdmission.pull); returns frames accepted."""
        return self.admission.pull(tap, budget)

    def enqueue(self, frames: Sequence[bytes], vnet_hdr_len: int | None = None) -> int:
        """Frames from the TAP into the journal (TxAdmission's rules); returns frames accepted."""
        return self.admission.admit(frames, vnet_hdr_len)

    def _datapath(self, call: Callable[[], int]) -> int:
        try:
            return call()
        except Escalation as e:
            self._restart_after(e)
            return 0

    def xmit(self) -> int:
        idle = self.journal.in_device() == 0
        n = self._datapath(self.domain.xmit)
        if idle and n:
            self.hangs.started(time.monotonic())
        return n

    def poll(self, timeout: float = 0.0) -> int:
        return self._datapath(lambda: self.domain.poll(timeout))

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Datapath turns in the engine's loop for up to timeout seconds, back early when Python
        is needed or wake_fd is readable."""
        return self._datapath(lambda: self.domain.run(timeout, wake_fd))

    def runs_in_c(self) -> bool:
        """The datapath runs whole turns itself (it reads the TAP in its loop)."""
        return self.engine.caps.runs_turns

    def keeps_tx_clock(self) -> bool:
        """The datapath keeps the TX hang clock itself and its loop comes back when TX stalls:
        check_tx_progress is then due at every turn, not on a timer."""
        return self.engine.caps.keeps_tx_clock

    def check_tx_progress(self, now: float | None = None) -> bool:
        """The hang watch's look (udrv/hangwatch.py); also logs recoveries whose traffic never
        came back. False when a hang was found and recovered from."""
        self.log.flush(now)
        return self.hangs.check(now)

    def _link_down(self) -> bool:
        """Asked when a hang is suspected: True if the device says its link is down (False
        also when it cannot tell: a device that cannot answer is hung)."""
        try:
            return not self.link_check().up
        except UdrvError:
            return False

    def _recover_tx_hang(self, what: str, escalate: str) -> None:
        try:
            self.domain.recover_tx_hang(what, escalate)
        except Escalation as e:
            self.hangs.escalated()
            self._restart_after(e)

    def _progress(self) -> None:
        now = time.monotonic()
        self.hangs.moved(now)
        self.log.traffic(now)
        if self.on_progress is not None:
            self.on_progress()

    def _on_recovery(self, rec: Recovery) -> None:
        self.counters.recoveries += 1
        self.log.add(rec)

    # --- process-level style recovery -------------------------------------------------------------
    def _restart_after(self, e: Escalation) -> None:
        self.counters.escalations += 1
        if self.impls.escalated() is not None:
            self.counters.swaps += 1
        if e.fault.kind == "disconnect" and "injected" not in e.fault.detail:
            self._transport_dead = True
        last = self.log.last                     # before the restart adds any
        try:
            ms = self.restart()
            if last is not None and last.outcome == "escalated" and last.restart_ms is None:
                last.restart_ms = ms       # what the escalation cost in all: recovery_ms + this
        except UdrvError as err:
            self.counters.restart_failures += 1
            self.state = "down"
            self.log.flush(all=True)               # the recovery that led here, before its outcome
            self.last_error = str(err)
            log.error("event=restart-failed error=%s (retried at the next link check)", err)

    def restart(self) -> float:
        """Full restart: a fresh domain on the device, probe, replay config, re-issue journal.
        Returns its milliseconds."""
        t0 = time.monotonic()
        # bind and probe have deadlines of their own (udrv/guard.py); the whole is bounded by them
        self.on_busy(t0 + 20.0)
        try:
            return self._restart(t0)
        finally:
            self.on_busy(None)

    def _restart(self, t0: float) -> float:
        self.counters.restarts += 1
        self.domain.retire()
        self.ledger.retire(self.engine)
        if self.reopen is not None and self._transport_dead:
            # a replugged USB device is a new device (new address, new handle): open it again
            try:
                self.transport.close()
            except Exception:
                pass
            self.transport = self.reopen()      # raises DeviceNotFound while still unplugged
            self._transport_dead = False
            self.transport_generation += 1
        self.domain = self._make_domain()
        try:
            self.domain.bring_up()
            self.domain.replay(self.config_log.calls())
        except (Escalation, DeviceGone) as e:
            gone = isinstance(e, DeviceGone) or (isinstance(e, Escalation) and e.fault.kind == "disconnect")
            self._transport_dead = self._transport_dead or gone
            raise UdrvError(f"the device did not come back after a restart: {e}") from None
        self.journal.rewind()
        self.engine.xmit()
        self.state = "up"
        self.on_state()
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

    def tap_counts(self) -> TapCounts:
        """TAP-side counts of the interface: what the runtime admitted plus what every datapath
        that reads the TAP itself counted."""
        a = self.admission.counts
        return TapCounts(a.frames_in, a.offload_frames, dict(a.dropped)) + self.ledger.tap(self.engine)

    def status(self) -> dict[str, Any]:
        c = self.ledger.datapath(self.engine)
        st = self.driver.stats()
        soft = self.driver.soft
        tap = self.tap_counts()
        report = self.engine.report()
        self.journal.sync()          # a C ring moves the indices without telling the Python mirrors
        tx_dropped = dict(tap.dropped)
        if self.journal.aqm_drops:
            tx_dropped["aqm"] = self.journal.aqm_drops
        info = self.transport.info
        return {
            "driver": self.driver.name,
            "device": info.ident,
            "state": self.state,
            "mac": ":".join(f"{b:02x}" for b in self.driver.mac),
            "mtu": soft.mtu,
            "rx_mode": {"promisc": soft.mode.promisc, "allmulti": soft.mode.allmulti,
                        "multicast": [m.hex() for m in soft.mode.multicast]},
            "link": {"up": self.link.up, "speed": self.link.speed, "full_duplex": self.link.full_duplex},
            "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
            "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes,
            "rx_errors": sum(c.rx_dropped.values()) + st.rx_errors,
            "tx_errors": sum(c.tx_errors.values()) + st.tx_errors,
            "rx_dropped": dict(c.rx_dropped), "rx_missed": st.rx_missed,
            "tx_dropped": tx_dropped, "tap_frames_in": tap.frames_in, "offload_frames": tap.offload_frames,
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
            "last_recovery": self.log.last.as_dict() if self.log.last else None,
            "driver_stats": st.extra,
            "tx_thread": report.tx_thread,         # a USB C ring with its TX half on a thread of its own
            "c_loop": report.c_loop if self.runs_in_c() else None,   # turns and sleeps of a loop in C
            "tx_segments": tap.segments,           # wire frames cut in software from TSO frames
            "rx_coalesce": report.rx_coalesce,     # GRO in the driver
        }

    def close(self) -> None:
        self.domain.close()
        self.journal.close()
