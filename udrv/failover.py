"""What the supervisor decides about failures, and what it reports of each.

  Policy          the thresholds (detection, swap, back-off, give up), with defaults
  Failover        one process-level recovery as the user sees it (log line, `udrv status`)
  FailureLedger   which implementation new workers run (nDriver's design diversity: the next one
                  after `swap_after` failures within `swap_window`, the preferred one back after
                  `swap_back_after` quiet seconds), and crash loops: workers that fail within
                  `stable_after` of coming up, in a row, back off (doubling from
                  `backoff_initial` to `backoff_max`), and after `give_up_after` of them the
                  supervisor stops trying.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("udrv.supervisor")


@dataclass(frozen=True)
class Policy:
    heartbeat_timeout: float = 0.012   # a beat older than this, outside a configuration call: frozen ...
    stopped_check: float = 0.006       # a beat this old: is the loop stopped (SIGSTOP, a tracer)? then frozen at once
    starved_timeout: float = 0.5       # ... unless its loop is runnable but not given a CPU (a loaded host)
    blocked_timeout: float = 0.1       # a loop asleep this long past its beat is blocked in a call
    config_grace: float = 0.1          # past a configuration call's own deadline before it is frozen
    takeover_timeout: float = 5.0      # a worker taking over (or probing) that has not come up by then
    start_timeout: float = 30.0        # a worker that has not said hello by then (imports, a slow disk)
    swap_after: int = 3                # failures of one implementation within swap_window ...
    swap_window: float = 60.0          # ... and the next workers run the next implementation
    swap_back_after: float = 300.0     # quiet seconds on a fallback before the preferred one returns
    stable_after: float = 0.25         # a worker up this long was not a crash loop
    backoff_initial: float = 0.05      # before a worker start after a crash-loop failure; doubles
    backoff_max: float = 5.0
    give_up_after: int = 8             # crash-loop failures in a row: stop trying

    def with_heartbeat(self, timeout: float) -> "Policy":
        """The thresholds for a machine whose loop needs `timeout` to go round (an emulated one):
        starved and blocked scale with it, so a slow machine is not taken for a frozen worker
        (there a loop waits for the interpreter lock for hundreds of milliseconds, asleep as a
        thread blocked in a call is)."""
        from dataclasses import replace
        t = max(0.001, timeout)
        return replace(self, heartbeat_timeout=t, stopped_check=max(Policy.stopped_check, t / 2),
                       starved_timeout=max(Policy.starved_timeout, 7 * t),
                       blocked_timeout=max(Policy.blocked_timeout, 3 * t))


@dataclass
class Failover:
    """One process-level recovery, as the user sees it."""
    pid: int
    cause: str                   # "killed by SIGKILL", "exited with status 70", "froze"
    detected_by: str             # pidfd | heartbeat
    implementation: str
    at: float = field(default_factory=time.time)
    detection_ms: float = 0.0    # last heartbeat of the dead worker -> the supervisor knew
    failover_ms: float | None = None   # detection -> the successor up (device restored, journal re-issued)
    successor: int = 0
    successor_implementation: str = ""
    spare_ready: bool = True     # False: no spare was ready, a cold worker start
    how: str = ""                # restored from the checkpoint | probed and configuration replayed
    reissued: int = 0
    takeover_ms: float = 0.0     # of the failover: the successor restoring the device, re-issuing
    silent_ms: float | None = None     # last frame before the fault -> first frame after it
    idle_before_ms: float = 0.0  # of the silence: no frame moved between the last one and the fault
    _t_detect: float = 0.0
    _progress_before: int = 0

    def line(self) -> str:
        silent = "n/a (no traffic)" if self.silent_ms is None else f"{self.silent_ms:.2f} ms"
        fo = "n/a" if self.failover_ms is None else f"{self.failover_ms:.2f} ms"
        head = (f"failover: worker={self.pid} ({self.implementation}) {self.cause} detected_by={self.detected_by} "
                f"detection={self.detection_ms:.2f} ms; ")
        if not self.successor:
            return head + "not replaced: the supervisor gave up (see event=gave-up)"
        spare = "spare promoted" if self.spare_ready else "no spare ready: cold start"
        return (head + f"{spare}: worker={self.successor} "
                f"({self.successor_implementation}) {self.how} in {self.takeover_ms:.2f} ms; "
                f"reissued={self.reissued} failover={fo} silent={silent}"
                + (f" (idle {self.idle_before_ms:.0f} ms before the fault)" if self.idle_before_ms >= 1 else ""))

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class FailureLedger:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.implementations: list[str] = []     # best first, as the first worker named them
        self.current = ""                        # what new workers run
        self.next_start = 0.0                    # no worker starts before (time.monotonic)
        self.gave_up = ""                        # why the supervisor stopped trying ("" = it did not)
        self.quick = 0                           # crash-loop failures in a row
        self._times: dict[str, list[float]] = {}
        self._last = 0.0

    def named(self, implementations: list[str]) -> None:
        if not self.implementations:
            self.implementations = list(implementations)
            self.current = self.current or (self.implementations[0] if self.implementations else "")

    def failed(self, impl: str, up_at: float, now: float) -> bool:
        """A worker running `impl` failed (up since `up_at`, 0: never up). True when the supervisor
        gives up with this one."""
        p = self.policy
        self._last = now
        times = [t for t in self._times.get(impl, []) if now - t < p.swap_window] + [now]
        self._times[impl] = times
        if len(times) >= p.swap_after and len(self.implementations) > 1:
            i = self.implementations.index(impl) if impl in self.implementations else 0
            nxt = self.implementations[(i + 1) % len(self.implementations)]
            if nxt != impl:
                self.current = nxt
                self._times[impl] = []
                log.warning("event=swap from=%s to=%s after=%d failures within %g s", impl, nxt, len(times),
                            p.swap_window)
        self.quick = self.quick + 1 if (not up_at or now - up_at < p.stable_after) else 0
        if self.quick >= p.give_up_after:
            self.gave_up = (f"{self.quick} workers in a row failed within {p.stable_after:g} s of starting "
                            f"(last: {impl}); the interface stays, carrier off: fix the cause (see the log above) "
                            f"and restart udrv")
            log.error("event=gave-up %s", self.gave_up)
            return True
        if self.quick >= 2:
            delay = min(p.backoff_max, p.backoff_initial * 2 ** (self.quick - 2))
            self.next_start = now + delay
            log.warning("event=backoff next_worker_in=%.0f ms after %d quick failures", delay * 1e3, self.quick)
        return False

    def swap_back(self, now: float) -> str:
        """The preferred implementation, when it is due back after a quiet period ("" otherwise)."""
        pref = self.implementations[0] if self.implementations else ""
        if not pref or self.current == pref or now - self._last <= self.policy.swap_back_after:
            return ""
        log.warning("event=swap-back to=%s after %g quiet seconds on %s (it takes over at the next failover)",
                    pref, self.policy.swap_back_after, self.current)
        self.current = pref
        return pref
