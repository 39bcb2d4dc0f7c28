"""What a NIC tells the user: recoveries as they happen, one log line each, and the counters
of the interface, which survive a restart as a kernel netdev's survive a reset.

A datapath recovery's line waits for the traffic to move again, so that it can say how long
the network was silent: from the last frame that moved before the fault to the first frame
after the recovery (the user's side of the event: a hang or a deadline counts in full, not from
when udrv noticed it); if nothing moves within `SILENCE_LOG_AFTER`, the line goes out saying so.
Configuration recoveries are logged at once: they do not stop traffic.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .datapath import Datapath, DatapathCounters, TapCounts
from .guard import Recovery

log = logging.getLogger("udrv.recovery")

SILENCE_LOG_AFTER = 2.0       # seconds a datapath recovery's line waits for traffic
KEPT = 100                    # recoveries kept for `udrv status`


class RecoveryLog:
    def __init__(self, on_recovery: Callable[[Recovery], None] | None = None):
        self.records: list[Recovery] = []
        self.on_recovery = on_recovery or (lambda r: None)
        self._awaiting: list[Recovery] = []
        self.last_error = ""
        self.last_traffic: float | None = None     # when a frame last moved (time.monotonic)

    def add(self, rec: Recovery) -> None:
        self.records.append(rec)
        del self.records[:-KEPT]
        self.last_error = f"{rec.entry}: {rec.fault}: {rec.detail}"
        rec._last_frame = self.last_traffic
        if rec.entry in ("xmit", "poll") or rec.outcome == "escalated":
            self._awaiting.append(rec)
        else:
            log.warning("%s", rec.line())
        self.on_recovery(rec)

    def traffic(self, now: float | None = None) -> None:
        """Frames moved: the silence of every recovery waiting for it ends now."""
        now = time.monotonic() if now is None else now
        self.last_traffic = now
        if not self._awaiting:
            return
        for rec in self._awaiting:
            start = rec._t0 if rec._last_frame is None else min(rec._t0, rec._last_frame)
            rec.silent_ms = (now - start) * 1000
            rec.quiet_before_ms = (rec._t0 - start) * 1000
            log.warning("%s", rec.line())
        self._awaiting.clear()

    def flush(self, now: float | None = None, *, all: bool = False) -> None:
        """Log the recoveries that have waited too long for traffic (their silence unknown), or
        every waiting one (a restart failed: traffic will not come back soon)."""
        now = time.monotonic() if now is None else now
        late = [r for r in self._awaiting if all or now - r._t0 > SILENCE_LOG_AFTER]
        for rec in late:
            log.warning("%s", rec.line())
            self._awaiting.remove(rec)

    @property
    def last(self) -> Recovery | None:
        return self.records[-1] if self.records else None


class CountLedger:
    """The datapath counters of every datapath this NIC has had: a restart retires one and
    its counts stay in the interface's totals."""

    def __init__(self) -> None:
        self._past = DatapathCounters()
        self._past_tap = TapCounts()
        self._retired: Datapath | None = None

    def retire(self, engine: Datapath) -> None:
        """The engine is going away; a restart that fails before the next engine exists may
        retire the same one again: it counts once."""
        if engine is self._retired:
            return
        self._past = self._past + engine.counters
        self._past_tap = self._past_tap + engine.tap_counts()
        self._retired = engine

    def datapath(self, engine: Datapath) -> DatapathCounters:
        return self._past if engine is self._retired else self._past + engine.counters

    def tap(self, engine: Datapath) -> TapCounts:
        return self._past_tap if engine is self._retired else self._past_tap + engine.tap_counts()
