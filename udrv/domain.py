"""A driver domain: one driver instance on its transport, its datapath and its guard.

This is the part of a NIC that can fail and be replaced whole: a restart discards the domain
and builds a fresh one on the same device (the TAP, the journal, the config log and the
counters outlive it, in `udrv.nic.Nic`). Every driver call goes through the guard: the
in-process level of recovery (rollback, restore from the checkpoint, re-issue) happens here;
what the guard cannot absorb comes out as `Escalation` for the NIC to restart.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from .actions import ActionList
from .configlog import LoggedCall
from .datapath import Datapath
from .driver import FrameSink, NetDriver
from .errors import TransferTimeout, TxHang
from .faults import FaultInjector
from .guard import Guard, Recovery, Watchdog, driver_side
from .journal import TxJournal


class DriverDomain:
    def __init__(self, driver: NetDriver, actions: ActionList, transport: Any, journal: TxJournal,
                 sink: FrameSink, *,
                 rings: tuple[int, int], injector: FaultInjector, watchdog: Watchdog | None,
                 on_recovery: Callable[[Recovery], None], on_progress: Callable[[], None],
                 tx_timeout: float, guards: bool, retry: bool,
                 config_deadline: float, datapath_deadline: float):
        self.driver = driver
        self.actions = actions
        self.transport = transport
        self.engine: Datapath = driver.make_datapath(journal, sink, rings[0], rings[1], on_progress)
        self.engine.watch_tx(tx_timeout)
        self.guard = Guard(driver, injector, on_recovery=on_recovery,
                           reset_datapath=self._reset_datapath, sync_datapath=self._sync_datapath,
                           config_deadline=config_deadline, datapath_deadline=datapath_deadline,
                           enabled=guards, watchdog=watchdog, retry=retry, device_writes=self._device_writes)

    # --- the guard's hooks -------------------------------------------------------------------
    def _device_writes(self) -> object:
        """The transport's count of state-changing requests (None where it keeps none), with the
        transport's identity: a reopened device starts counting again."""
        n = self.transport.device_writes
        return None if n is None else (id(self.transport), n)

    def _reset_datapath(self, fault: BaseException) -> tuple[int, str]:
        """After a datapath fault and the device's restore: (TX entries re-issued, what happened
        to the transfers in flight). A datapath whose state the driver cannot tear (the C USB
        ring: it changes only inside its own calls) keeps its transfers after a fault of the
        driver's own when nothing reset the device's endpoints; otherwise everything is recycled,
        without clearing halts after a timeout, which leaves none (Linux usbnet's tx_timeout
        likewise only unlinks)."""
        e = self.engine
        if driver_side(fault) and e.caps.keeps_in_flight and e.resume():
            return 0, "in-flight transfers kept"
        return e.recycle(clear_halts=not isinstance(fault, TransferTimeout))

    def _sync_datapath(self) -> None:
        """After a restore: transfers in flight iff the restored driver is open."""
        self.engine.stop()
        if self.driver.soft.opened:
            self.engine.start()

    # --- entry points ---------------------------------------------------------------------------
    def bring_up(self) -> None:
        """Claim, probe (both as transactions) and take the first checkpoint."""
        self.guard.config("bind")
        self.guard.config("probe")
        self.guard.take_checkpoint()

    def adopt(self, soft: Any, checkpoint: Any) -> None:
        """Claim the device and bring it back to another worker's last checkpoint (the device
        may be anywhere between that checkpoint and the call that was running when that worker
        died); the datapath starts if the restored driver is open."""
        self.guard.config("bind")
        self.guard.adopt(soft, checkpoint)

    def replay(self, calls: Iterable[LoggedCall]) -> None:
        """The host's configuration, as logged, onto a freshly probed driver."""
        for call in calls:
            self.guard.config(call.entry, *call.args)

    def config(self, entry: str, *args: Any) -> Any:
        return self.guard.config(entry, *args)

    def xmit(self) -> int:
        return self.guard.datapath("xmit", self.engine.xmit)

    def poll(self, timeout: float) -> int:
        return self.guard.datapath("poll", self.engine.poll, timeout)

    def run(self, timeout: float, wake_fd: int) -> int:
        """Turns in the datapath's loop, guarded as "poll" (it does what poll() does, only
        without a Python round trip per turn)."""
        return self.guard.datapath("poll", self.engine.run, timeout, wake_fd)

    def recover_tx_hang(self, what: str, escalate: str) -> None:
        """A TX hang is the device's: restore it and recycle the OUT side (or escalate)."""
        self.guard.recover_datapath("xmit", TxHang(what), escalate=escalate)

    # --- teardown ---------------------------------------------------------------------------------
    def retire(self) -> None:
        """For a restart: stop the datapath and give back what the driver holds, without asking
        the driver (it is the thing that failed)."""
        try:
            self.engine.stop()
        except Exception:
            pass
        self.engine.close()
        self.actions.release_all()

    def close(self) -> None:
        """For good: stop the device as the driver does (unguarded: nothing to recover into),
        then give everything back."""
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
        self.engine.close()
