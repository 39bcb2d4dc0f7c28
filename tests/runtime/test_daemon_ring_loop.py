"""The daemon hands its turns to a datapath that runs in C (Nic.runs_in_c) and still answers the
control socket: the ring's loop sleeps on a wake fd that the daemon's fds make readable."""
from __future__ import annotations

import os
import select
import threading
from typing import Any

import pytest

from udrv import daemon as daemon_mod
from udrv.datapath import Capabilities
from udrv.driver import LinkState
from udrv.control import request
from udrv.daemon import Daemon, DaemonTimers


class FakeJournal:
    def space(self) -> int:
        return 10


class NoFds:
    def poll_fds(self) -> tuple:
        return ()


class FakeEngine:
    caps = Capabilities(reads_tap=True, runs_turns=True)


class FakeNic:
    """What Daemon.run touches of a Nic whose engine runs its turns in C."""
    link = LinkState(True)

    def __init__(self) -> None:
        self.state = "up"
        self.engine = FakeEngine()
        self.journal = FakeJournal()
        self.transport_generation = 0
        self.transport = NoFds()
        self.runs: list[tuple[float, int]] = []
        self.woken = 0
        self.xmits = 0
        self.polls = 0
        self.recoveries: list[Any] = []

    def runs_in_c(self) -> bool:
        return True

    def keeps_tx_clock(self) -> bool:
        return False

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        # the C ring's loop: sleep until the wake fd is readable or the timeout passes
        self.runs.append((timeout, wake_fd))
        ready, _, _ = select.select([wake_fd], [], [], timeout)
        if ready:
            self.woken += 1
        return 0

    def xmit(self) -> int:
        self.xmits += 1
        return 0

    def poll(self, timeout: float = 0.0) -> int:
        self.polls += 1
        return 0

    def check_tx_progress(self, now: float | None = None) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "rx_packets": 7}


class FakeTap:
    name = "udrvloop0"
    ifindex = 42

    def __init__(self) -> None:
        # permanently readable: a Python loop that still polled the TAP would spin on it
        self.rfd, self.wfd = os.pipe()
        os.write(self.wfd, b"x")
        self.fd = self.rfd

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


@pytest.fixture
def loop(tmp_path, monkeypatch):
    monkeypatch.setenv("UDRV_RUN_DIR", str(tmp_path))
    nic, tap = FakeNic(), FakeTap()
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=3600, tx_progress=3600))  # type: ignore[arg-type]
    d._open_control()
    t = threading.Thread(target=d.run, args=(20.0,), daemon=True)
    t.start()
    yield d, nic
    d.stop()
    t.join(timeout=10)
    d._wake.close()
    assert d._ctrl is not None
    d._ctrl.close()
    tap.close()


def test_status_is_answered_while_the_ring_runs_in_c(loop):
    d, nic = loop
    reply = request("udrvloop0", {"cmd": "status"})
    assert reply["ok"] and reply["status"]["rx_packets"] == 7 and reply["status"]["ifindex"] == 42
    # the request woke the ring's loop through the wake fd (not its timeout) ...
    assert nic.woken >= 1
    # ... which the daemon passed on every turn, with turns no longer than ring_turn
    assert nic.runs and all(fd >= 0 and timeout <= d.timers.ring_turn for timeout, fd in nic.runs)
    # the Python per-turn pump is not used: the ring moves frames itself
    assert nic.polls == 0


def test_the_loop_does_not_watch_the_tap_a_c_ring_reads(loop):
    d, nic = loop
    request("udrvloop0", {"cmd": "status"})
    # the TAP fd is readable all along: had the Python poller watched it, every turn would
    # return at once and the ring would never sleep its turn out
    assert not d._tap_registered


class ClockedNic(FakeNic):
    """A ring that keeps its own TX hang clock (NativeUsbRing): its loop comes back on a stall."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def keeps_tx_clock(self) -> bool:
        return True

    def check_tx_progress(self, now: float | None = None) -> bool:
        self.checks += 1
        return True


def _run_clocked(nic: ClockedNic, tap: FakeTap, seconds: float, ring_turn: float) -> None:
    """The daemon's loop for `seconds`, its link tick an hour away and a TX timer of 10 ms."""
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=3600, tx_progress=0.01,  # type: ignore[arg-type]
                                             ring_turn=ring_turn))
    d.run(seconds)
    d._wake.close()
    tap.close()


def test_a_ring_with_its_own_tx_clock_is_checked_every_turn_and_no_tx_timer_cuts_its_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("UDRV_RUN_DIR", str(tmp_path))
    nic = ClockedNic()
    # a TX timer of 10 ms would cut every turn to 10 ms; the ring's clock makes it unnecessary
    _run_clocked(nic, FakeTap(), 0.55, ring_turn=0.1)
    assert len(nic.runs) >= 3 and all(timeout > 0.05 for timeout, _fd in nic.runs[:-1]), nic.runs
    assert nic.checks >= len(nic.runs) - 1           # at every turn's end


class LinkLostNic(ClockedNic):
    """Its ring came back on a stall and the hang check found the link down (Nic._link_down)."""

    def check_tx_progress(self, now: float | None = None) -> bool:
        self.checks += 1
        self.link = LinkState(False)
        return True


class CarrierTap(FakeTap):
    def __init__(self) -> None:
        super().__init__()
        self.carrier: list[bool] = []

    def set_carrier(self, up: bool) -> None:
        self.carrier.append(up)


def test_a_link_found_down_by_the_hang_check_drops_the_carrier_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UDRV_RUN_DIR", str(tmp_path))
    nic, tap = LinkLostNic(), CarrierTap()
    _run_clocked(nic, tap, 0.2, ring_turn=0.05)   # only the hang check can have told the TAP
    assert nic.checks >= 1 and tap.carrier == [False], tap.carrier
