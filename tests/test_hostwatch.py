"""Host-side housekeeping (TAP configuration, CPU placement) runs beside the datapath loop, not in
its turns: a slow read of the TAP never holds the ring still, and a changed configuration is
still applied to the driver by the loop itself."""
from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

from udrv.daemon import Daemon, DaemonTimers
from udrv.hostwatch import HostWatch
from udrv.tap import HostConfig

BASE = HostConfig(mac=b"\x02\x00\x00\x00\x00\x01", mtu=1500, up=True, promisc=False, allmulti=False,
                  multicast=())


class RingNic:
    """A NIC whose datapath runs in C: run() sleeps its turn out (or until the wake fd)."""

    def __init__(self) -> None:
        self.state = "up"
        self.engine = type("E", (), {"owns_tap": True})()
        self.journal = type("J", (), {"space": lambda self: 10})()
        self.transport_generation = 0
        self.transport = object()
        self.runs = 0
        self.rx_modes: list[tuple[Any, int]] = []
        self.driver = type("D", (), {"soft": type("S", (), {"mtu": 1500})()})()

    def runs_in_c(self) -> bool:
        return True

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        self.runs += 1
        select.select([wake_fd], [], [], min(timeout, 0.01))
        return 0

    def xmit(self) -> int:
        return 0

    def check_tx_progress(self, now: float | None = None) -> bool:
        return True

    def set_rx_mode(self, mode: Any) -> None:
        self.rx_modes.append((mode, threading.get_ident()))


class SlowTap:
    """host_config() blocks until the test lets it go, then reports `config`."""
    name, ifindex = "udrvhw0", 9

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        self.fd = self.rfd
        self.config = BASE
        self.gate = threading.Event()
        self.reading = threading.Event()
        self.readers: set[int] = set()

    def host_config(self) -> HostConfig:
        self.readers.add(threading.get_ident())
        self.reading.set()
        self.gate.wait(10)
        return self.config

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def run_daemon(nic: RingNic, tap: SlowTap) -> tuple[Daemon, threading.Thread]:
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=0.02, tx_progress=3600))  # type: ignore[arg-type]
    d._placement.enabled = False
    d._applied = BASE
    t = threading.Thread(target=d.run, args=(20.0,), daemon=True)
    t.start()
    return d, t


def test_a_blocked_read_of_the_tap_leaves_the_ring_turning_and_a_change_is_applied_by_the_loop():
    nic, tap = RingNic(), SlowTap()
    d, t = run_daemon(nic, tap)
    try:
        assert tap.reading.wait(5), "the host configuration was never read"
        before = nic.runs
        end = time.monotonic() + 5
        while nic.runs < before + 5 and time.monotonic() < end:
            time.sleep(0.01)
        # the read is still blocked, and the loop went on handing turns to the ring
        assert not tap.gate.is_set() and nic.runs >= before + 5
        assert t.ident not in tap.readers
        # the host turns promiscuous mode on: the loop (not the reading thread) tells the driver
        tap.config = HostConfig(**{**BASE.__dict__, "promisc": True})
        tap.gate.set()
        end = time.monotonic() + 5
        while not nic.rx_modes and time.monotonic() < end:
            time.sleep(0.01)
        assert nic.rx_modes and nic.rx_modes[0][0].promisc and nic.rx_modes[0][1] == t.ident
    finally:
        tap.gate.set()
        d.stop()
        t.join(10)
        d._wake.close()
        tap.close()
    assert not t.is_alive()
    assert len(nic.rx_modes) == 1          # applied once, not on every look


def test_hostwatch_counts_changes_skips_failed_reads_and_ticks_every_n_looks():
    values: list[Any] = [1, 1, OSError("gone"), 2, 2, ValueError("a bug"), 3]
    ticks = []
    done = threading.Event()

    def read() -> int:
        v = values.pop(0) if values else 3
        if not values:
            done.set()
        if isinstance(v, Exception):
            raise v
        return v

    w = HostWatch(read, lambda: ticks.append(1), period=0.005, tick_every=2).start()
    try:
        assert done.wait(5)
        time.sleep(0.05)
    finally:
        w.stop()
    # 1 -> 2 -> 3: three changes; the failed read and the raising one changed nothing and did
    # not end the thread (it went on to read 3)
    assert w.latest == 3 and w.seq == 3
    assert ticks
