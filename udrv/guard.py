"""Entry points as transactions (FGFT), in process.

Configuration entry points: before the call, snapshot the driver's soft state and keep the
last device checkpoint; mark the action list. On a fault (an exception, the watchdog's
deadline, a broken invariant): put the soft state back, undo the actions taken since the
mark, restore the device from the checkpoint — so the failed call leaves no partial effect
(at-most-once) — and retry once. A second failure escalates to the supervisor.

Datapath entry points run millions of times: the guard is a try/except plus one tuple store
for the watchdog. On a fault it restores the last checkpoint, recycles the datapath's
buffers and re-issues the unconfirmed TX journal — unless the fault was the driver's own
(an exception, a deadline: nothing the device reported) and the datapath can show its
buffers are intact, in which case they stay in flight (the shadow-driver split: the
framework's transfers are not the driver's state to roll back).
"""
from __future__ import annotations

import copy
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import (DeviceGone, DriverFault, EntryTimeout, Escalation, InjectedFault, Stall, TransferTimeout,
                     TransportError, TxHang)
from .faults import FaultInjector
from .ccallback import inside_c_callback
from .threadname import name_this_thread

log = logging.getLogger("udrv.guard")


@dataclass
class Recovery:
    """One recovery, as reported to the user (invariant 6)."""
    entry: str
    fault: str                  # exception | timeout | invariant | stall | device_timeout | disconnect
    detail: str
    outcome: str = "recovered"  # recovered | retried | escalated
    rolled_back: list[str] = field(default_factory=list)
    soft_state_restored: bool = False
    device_restored: bool = False
    device_untouched: bool = False   # driver-side fault, no device write since the checkpoint: no restore needed
    reissued: int = 0
    at: float = field(default_factory=time.time)
    recovery_ms: float = 0.0
    restore_ms: float = 0.0          # of which: the device restored from the checkpoint
    datapath_ms: float = 0.0         # ... and the datapath recycled (transfers / rings, re-issue)
    silent_ms: float | None = None   # last frame before the fault -> first frame after (None: no traffic yet)
    quiet_before_ms: float = 0.0     # of which: no frame moved before the recovery began (a hang, an idle link)
    restart_ms: float | None = None  # escalated: the full restart that followed (Nic.restart)
    _t0: float = field(default=0.0, repr=False)
    _last_frame: float | None = field(default=None, repr=False)

    def line(self) -> str:
        if self.silent_ms is not None:
            silent = f" silent={self.silent_ms:.2f} ms"
            if self.quiet_before_ms >= 1:
                silent += f" (no frame for {self.quiet_before_ms:.0f} ms before the recovery began)"
        elif self.entry in ("xmit", "poll") or self.outcome == "escalated":
            silent = " silent=n/a (no traffic)"
        else:
            silent = ""            # a configuration call that recovered stops no traffic
        restart = "" if self.restart_ms is None else f" restart={self.restart_ms:.2f} ms"
        return (f"recovery: entry={self.entry} fault={self.fault} ({self.detail}) outcome={self.outcome} "
                f"rolled_back={self.rolled_back or '-'} soft_state_restored={self.soft_state_restored} "
                f"device_restored={self.device_restored} device_untouched={self.device_untouched} "
                f"reissued={self.reissued} "
                f"recovery={self.recovery_ms:.2f} ms (restore {self.restore_ms:.2f}, datapath "
                f"{self.datapath_ms:.2f}){restart}{silent}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def classify(exc: BaseException) -> str:
    if isinstance(exc, TxHang):
        return "tx_timeout"
    if isinstance(exc, EntryTimeout):
        return "timeout"
    if isinstance(exc, Stall):
        return "stall"
    if isinstance(exc, TransferTimeout):
        return "device_timeout"
    if isinstance(exc, DeviceGone):
        return "disconnect"
    if isinstance(exc, DriverFault):
        return exc.kind
    if isinstance(exc, InjectedFault):
        return "exception"
    return "exception"


def _restore_failed(detail: str, exc: BaseException) -> str:
    """The clause a failed restore adds to a recovery's detail; an unplugged device fails the
    restore for the reason it failed the call, and the line says that reason once."""
    why = str(exc)
    return "; the restore failed for the same reason" if why and why in detail else f"; restore failed: {why}"


def driver_side(exc: BaseException) -> bool:
    """A fault of the driver's own making: nothing the device or the transport reported
    (those — STALL, timeouts, a failed transfer, a vanished device — mean the device's
    queues need the full recycle)."""
    return not isinstance(exc, TransportError)


class Watchdog:
    """Interrupts an entry point that overran its deadline.

    A helper thread watches the current entry; when its deadline passes it signals the main
    thread, whose handler raises EntryTimeout inside the stuck Python code. (A hang inside a
    C call that never returns is the process-level supervisor's job.)
    """

    SIG = signal.SIGUSR2

    def __init__(self, tick: float = 0.005):
        # tick: how soon it looks again after firing (the signal may land in a C
        # callback). Otherwise the thread sleeps until the deadline of the newest entry and is
        # woken only by an entry due sooner (the setter of `current`): entries follow each other
        # by the dozen per second with deadlines a second out, and waking for each of them (or on
        # a fixed period) costs a few % of a vCPU in a QEMU guest while the C ring serves traffic.
        self.tick = tick
        self._current: tuple[str, float] | None = None   # (entry, deadline)
        self._fired_for: tuple[str, float] | None = None
        self._sleep_until = math.inf          # the deadline the thread sleeps towards
        self._last_deadline = 0.0             # of the newest entry (it may have ended already)
        self._wake = threading.Event()
        self.usable = threading.current_thread() is threading.main_thread()
        self._main = threading.main_thread().ident
        self._stop = False
        self.looks = 0                        # times the thread woke to look (tests, benches)
        if self.usable:
            signal.signal(self.SIG, self._on_signal)
            self._thread = threading.Thread(target=self._run, name="udrv-watchdog", daemon=True)
            self._thread.start()

    @property
    def current(self) -> tuple[str, float] | None:
        return self._current

    @current.setter
    def current(self, cur: tuple[str, float] | None) -> None:
        self._current = cur
        if cur is not None:
            self._last_deadline = cur[1]
            if cur[1] < self._sleep_until:
                self._wake.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        cur = self.current
        if cur is None or cur is not self._fired_for:
            return
        if inside_c_callback(frame):
            # an exception there would be swallowed by ctypes and lose a completion: the
            # watchdog fires again at its next tick, once the callback has returned
            self._fired_for = None
            return
        raise EntryTimeout(f"{cur[0]} overran its deadline")

    def _run(self) -> None:
        name_this_thread("udrv-watchdog")
        while not self._stop:
            self.looks += 1
            cur = self._current
            now = time.monotonic()
            if cur is not None and (cur is self._fired_for or now > cur[1]):
                if cur is not self._fired_for:
                    self._fired_for = cur
                    try:
                        signal.pthread_kill(self._main, self.SIG)
                    except (ProcessLookupError, OSError):
                        return
                self._sleep(now + self.tick, cur)   # fired: see soon whether it must fire again
                continue
            # nothing running: towards the newest entry's deadline all the same (the next entries
            # are due later than it, they need not wake the thread), for ever once that passed
            due = cur[1] if cur is not None else self._last_deadline
            self._sleep(due + 0.001 if due > now else math.inf, cur)

    def _sleep(self, until: float, cur: tuple[str, float] | None) -> None:
        self._sleep_until = until
        self._wake.clear()
        if self._current is not cur or self._stop:   # changed before the setter could see `until`
            return
        self._wake.wait(None if until == math.inf else max(0.0, until - time.monotonic()))

    def close(self) -> None:
        self._stop = True
        self._wake.set()


class Guard:
    def __init__(self, driver: Any, injector: FaultInjector | None = None, *,
                 on_recovery: Callable[[Recovery], None] | None = None,
                 reset_datapath: Callable[[BaseException], tuple[int, str]] | None = None,
                 sync_datapath: Callable[[], None] | None = None,
                 config_deadline: float = 1.0, datapath_deadline: float = 1.0,
                 enabled: bool = True, watchdog: Watchdog | None = None,
                 escalate_after: int = 3, escalate_window: float = 1.0, retry: bool = True,
                 device_writes: Callable[[], object] | None = None):
        self.driver = driver
        # device_writes() -> a token that changes whenever the device may have been told to change
        # state (USB: every control OUT and alt setting), or None where that is not known
        # (PCI: every MMIO write counts, the datapath's included): with an unchanged token a
        # fault of the driver's own left the device as the checkpoint describes it
        self.device_writes = device_writes or (lambda: None)
        self._writes_at_checkpoint: object = None
        self.injector = injector or FaultInjector()
        self.on_recovery = on_recovery or (lambda r: None)
        # reset_datapath(the fault) -> (TX entries re-issued, what became of the buffers in flight)
        self.reset_datapath = reset_datapath or (lambda exc: (0, "nothing in flight"))
        self.sync_datapath = sync_datapath or (lambda: None)
        self.config_deadline = config_deadline
        self.datapath_deadline = datapath_deadline
        self.enabled = enabled
        self.watchdog = watchdog
        self.escalate_after = escalate_after
        self.escalate_window = escalate_window
        # retry=False: no in-process recovery, every fault escalates (the "full restart" baseline)
        self.retry = retry
        # bring-up may legitimately take long (PHY scans, chip settle times); nothing else should.
        # A link check reads a register or two, once a second from the daemon's loop, which serves
        # no frames while it runs: a hung one costs traffic its whole deadline, so it gets a quarter
        self.deadlines: dict[str, float] = {"bind": 5.0, "probe": 10.0, "link_check": config_deadline / 4}
        self._avg: dict[str, float] = {}        # running average duration per entry point
        self.checkpoint: Any = None
        self.checkpoint_soft: Any = None
        self.recoveries: list[Recovery] = []
        self._recent_dp_faults: list[float] = []

    # --- checkpoints ------------------------------------------------------------------------
    def take_checkpoint(self) -> None:
        self.checkpoint = self.driver.checkpoint()
        self.checkpoint_soft = copy.deepcopy(self.driver.soft)     # what a successor restores with it
        self._writes_at_checkpoint = self.device_writes()

    def device_as_checkpointed(self, exc: BaseException) -> bool:
        """No restore needed: the fault was the driver's own and nothing was written to the
        device since the checkpoint (so the device's state is the checkpoint's)."""
        token = self._writes_at_checkpoint
        return (self.checkpoint is not None and token is not None and driver_side(exc)
                and self.device_writes() == token)

    # --- configuration entry points -------------------------------------------------------
    def config(self, entry: str, *args: Any) -> Any:
        fn = getattr(self.driver, entry)
        if not self.enabled:
            return fn(*args)
        first: Recovery | None = None
        for attempt in (0, 1):
            soft = copy.deepcopy(self.driver.soft)
            mark = self.driver.actions.mark()
            t0 = time.monotonic()
            active = self.injector.begin(entry, self.driver) if self.injector.armed else None
            try:
                with self._deadline(entry, self.budget(entry, retry=first is not None and first.fault == "timeout")):
                    try:
                        result = fn(*args)
                    finally:
                        if active is not None:
                            self.injector.end(active, self.driver, ok=not active.fired)
                    broken = self.driver.invariants()
                if broken:
                    raise DriverFault(entry, "invariant", "; ".join(broken))
            except Exception as exc:
                rec = Recovery(entry, classify(exc), str(exc), _t0=t0)
                self.driver.soft = soft
                rec.soft_state_restored = True
                rec.rolled_back = self.driver.actions.rollback(mark)
                if not self.retry:
                    rec.outcome = "escalated"
                    self._report(rec)
                    raise Escalation(DriverFault(entry, rec.fault, rec.detail)) from exc
                try:
                    self._restore()
                    rec.device_restored = True
                except Exception as rexc:
                    rec.outcome = "escalated"
                    rec.detail += _restore_failed(rec.detail, rexc)
                    self._report(rec)
                    raise Escalation(DriverFault(entry, rec.fault, rec.detail)) from exc
                if attempt == 0 and self.retry:
                    rec.outcome = "retried"
                    first = rec
                    self._report(rec)
                    continue
                rec.outcome = "escalated"
                self._report(rec)
                raise Escalation(DriverFault(entry, rec.fault, rec.detail)) from exc
            self.take_checkpoint()
            # the retry's own time counts too, at once after a timeout: a machine that got slower
            # must raise the budget, or every later call overruns the same deadline again
            self._learn(entry, time.monotonic() - t0, at_least=first is not None and first.fault == "timeout")
            if first is not None:
                first.outcome = "recovered"
            return result
        raise AssertionError("unreachable")

    def budget(self, entry: str, retry: bool = False) -> float:
        """The deadline of a configuration call: the configured floor, or — on a slow machine
        where calls take longer — a guard above their running average (nDriver's detector).
        A short floor (link_check's) holds only once a call has shown what this machine takes:
        the first call, and the retry after a timeout, get the configuration deadline at least
        (a pegasus link check over a FunctionFS gadget in a loaded TCG guest took 0.7 s at start,
        and a daemon that escalates at start is a daemon that does not start)."""
        floor = self.deadlines.get(entry, self.config_deadline)
        avg = self._avg.get(entry)
        if avg is None or retry:
            return max(floor, self.config_deadline, 0.0 if avg is None else 4 * avg + 0.1)
        return max(floor, 4 * avg + 0.1)

    def _learn(self, entry: str, seconds: float, at_least: bool = False) -> None:
        avg = self._avg.get(entry)
        avg = seconds if avg is None else 0.8 * avg + 0.2 * seconds
        self._avg[entry] = max(avg, seconds) if at_least else avg

    def adopt(self, soft: Any, checkpoint: Any) -> None:
        """A successor's start: the soft state and checkpoint of the worker before it, restored
        onto the device within the restore's deadline (no retry: the caller probes instead)."""
        self.driver.soft = copy.deepcopy(soft)
        self.checkpoint = checkpoint
        self._restore()
        self.take_checkpoint()

    def _restore(self) -> None:
        with self._deadline("restore", max(self.config_deadline, self.budget("open"))):
            if self.checkpoint is not None:
                self.driver.restore(self.checkpoint)
            self.sync_datapath()

    class _Deadline:
        __slots__ = ("wd", "cur", "prev")

        def __init__(self, wd: Watchdog, cur: tuple[str, float]):
            self.wd, self.cur = wd, cur

        def __enter__(self) -> None:
            self.prev = self.wd.current
            self.wd.current = self.cur

        def __exit__(self, *exc: Any) -> None:
            self.wd.current = self.prev

    class _NoDeadline:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    def _deadline(self, entry: str, seconds: float) -> Any:
        if self.watchdog is None or not self.watchdog.usable:
            return self._NoDeadline()
        return self._Deadline(self.watchdog, (entry, time.monotonic() + seconds))

    # --- datapath entry points -----------------------------------------------------------------
    def datapath(self, entry: str, fn: Callable[..., int], *args: Any) -> int:
        if not self.enabled:
            return fn(*args)
        if self.injector.armed:
            return self._datapath_injected(entry, fn, *args)
        wd = self.watchdog
        if wd is None:
            try:
                return fn(*args)
            except Exception as exc:
                self.recover_datapath(entry, exc)
                return 0
        wd.current = (entry, time.monotonic() + self.datapath_deadline)
        try:
            return fn(*args)
        except Exception as exc:
            wd.current = None
            self.recover_datapath(entry, exc)
            return 0
        finally:
            wd.current = None

    def _datapath_injected(self, entry: str, fn: Callable[..., int], *args: Any) -> int:
        active = self.injector.begin(entry, self.driver)
        try:
            with self._deadline(entry, self.datapath_deadline):
                try:
                    r = fn(*args)
                finally:
                    if active is not None:
                        self.injector.end(active, self.driver, ok=not active.fired)
            return r
        except Exception as exc:
            self.recover_datapath(entry, exc)
            return 0

    def recover_datapath(self, entry: str, exc: Exception, escalate: str = "") -> None:
        """Roll back, restore the device (unless it is as checkpointed), reset the datapath and
        re-issue the journal; `escalate` (a reason) goes straight to a full restart."""
        t0 = time.monotonic()
        rec = Recovery(entry, classify(exc), str(exc), _t0=t0)
        now = time.monotonic()
        self._recent_dp_faults = [t for t in self._recent_dp_faults if now - t < self.escalate_window]
        self._recent_dp_faults.append(now)
        if len(self._recent_dp_faults) >= self.escalate_after or not self.retry:
            escalate = f"{len(self._recent_dp_faults)} datapath faults within {self.escalate_window}s"
        if escalate:
            rec.outcome = "escalated"
            rec.detail += f"; {escalate}"
            self._report(rec)
            self._recent_dp_faults.clear()
            raise Escalation(DriverFault(entry, rec.fault, rec.detail)) from exc
        try:
            with self._deadline("restore", self.config_deadline):
                t1 = time.monotonic()
                if self.device_as_checkpointed(exc):
                    # FGFT restores what the failed call may have changed; this one changed nothing
                    # on the device (each control transfer of a restore costs ~1.5 ms on dummy_hcd)
                    rec.device_untouched = True
                else:
                    if self.checkpoint is not None:
                        self.driver.restore(self.checkpoint)
                    rec.device_restored = True
                t2 = time.monotonic()
                rec.reissued, what = self.reset_datapath(exc)
                # the device is the checkpoint's again (the datapath reset's own requests, clear
                # halts and the like, touch no configured state)
                self._writes_at_checkpoint = self.device_writes()
                rec.restore_ms, rec.datapath_ms = (t2 - t1) * 1000, (time.monotonic() - t2) * 1000
                rec.rolled_back = [what]
        except Exception as rexc:
            rec.outcome = "escalated"
            rec.detail += _restore_failed(rec.detail, rexc)
            self._report(rec)
            raise Escalation(DriverFault(entry, rec.fault, rec.detail)) from exc
        self._report(rec)

    def _report(self, rec: Recovery) -> None:
        rec.recovery_ms = (time.monotonic() - rec._t0) * 1000
        self.recoveries.append(rec)
        self.on_recovery(rec)
