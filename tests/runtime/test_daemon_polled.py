"""A device without interrupts (a polled PCI ring) is looked at every `device_poll`, and at once
again while the last look found frames: sleeping between two full harvests would leave the CPU
idle while the device fills its ring (and drops)."""
from __future__ import annotations

import os
from typing import Any

from udrv.datapath import Capabilities
from udrv.driver import LinkState
from udrv.daemon import Daemon, DaemonTimers


class FakeJournal:
    def space(self) -> int:
        return 10


class PolledNic:
    """What Daemon.run touches of a Nic whose device has no event fd: frames are found by polling.
    `script` is what each successive poll finds; after it runs out, nothing."""
    link = LinkState(True)

    def __init__(self, script: list[int]) -> None:
        self.state = "up"
        self.engine = type("E", (), {"caps": Capabilities()})()
        self.journal = FakeJournal()
        self.transport_generation = 0
        self.transport = type("T", (), {"poll_fds": lambda self: ()})()   # a polled device
        self.script = list(script)
        self.found: list[int] = []

    def runs_in_c(self) -> bool:
        return False

    def keeps_tx_clock(self) -> bool:
        return False

    def xmit(self) -> int:
        return 0

    def poll(self, timeout: float = 0.0) -> int:
        n = self.script.pop(0) if self.script else 0
        self.found.append(n)
        return n

    def check_tx_progress(self, now: float | None = None) -> bool:
        return True


class QuietTap:
    """A TAP with nothing to send (never readable)."""
    name = "udrvpoll0"
    ifindex = 43

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()

    def read_batch(self, n: int) -> list[bytes]:
        return []

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


class RecordingPoller:
    """select.poll with each call's timeout recorded, paired with what the NIC's last poll found."""

    def __init__(self, inner: Any, nic: PolledNic) -> None:
        self.inner, self.nic = inner, nic
        self.waits: list[tuple[int, int]] = []      # (found by the poll before this wait, timeout ms)

    def register(self, fd: int, ev: int) -> None:
        self.inner.register(fd, ev)

    def unregister(self, fd: int) -> None:
        self.inner.unregister(fd)

    def poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        before = self.nic.found[-1] if self.nic.found else -1
        self.waits.append((before, timeout_ms))
        return self.inner.poll(timeout_ms)


def run_polled(script: list[int], device_poll: float, duration: float) -> tuple[PolledNic, RecordingPoller]:
    nic, tap = PolledNic(script), QuietTap()
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=3600, tx_progress=3600,  # type: ignore[arg-type]
                                             device_poll=device_poll))
    rec = RecordingPoller(d._poller, nic)
    d._poller = rec  # type: ignore[assignment]
    try:
        d.run(duration)
    finally:
        d._wake.close()
        tap.close()
    return nic, rec


def test_a_poll_that_found_frames_is_followed_by_another_without_sleeping():
    nic, rec = run_polled([0, 64, 64, 64, 7, 0], device_poll=0.05, duration=0.4)
    assert nic.found[:6] == [0, 64, 64, 64, 7, 0]
    after_work = [t for found, t in rec.waits if found > 0]
    after_idle = [t for found, t in rec.waits if found == 0]
    # every wait that followed a harvest with frames was no wait at all ...
    assert after_work == [0, 0, 0, 0]
    # ... while an empty harvest (or none yet) sleeps the polling period
    assert after_idle and all(t == 50 for t in after_idle)


def test_an_idle_polled_device_is_looked_at_every_period_not_in_a_spin():
    nic, rec = run_polled([], device_poll=0.05, duration=0.3)
    # 0.3 s at one look per 50 ms: a handful of looks, not thousands
    assert 3 <= len(nic.found) <= 8
    assert all(t == 50 for _, t in rec.waits[1:])
