"""Host-side housekeeping (TAP configuration, CPU placement) runs beside the datapath loop, not in
its turns: a slow read of the TAP never holds the ring still, and a changed configuration is
still applied to the driver by the loop itself."""
from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import pytest

from udrv.datapath import Capabilities
from udrv.driver import LinkState
from udrv.daemon import Daemon, DaemonTimers
from udrv.errors import UdrvError
from udrv.hostwatch import HostWatch
from udrv.tap import HostConfig

BASE = HostConfig(mac=b"\x02\x00\x00\x00\x00\x01", mtu=1500, up=True, promisc=False, allmulti=False,
                  multicast=())


class RingNic:
    """A NIC whose datapath runs in C: run() sleeps its turn out (or until the wake fd)."""
    link = LinkState(True)

    def __init__(self) -> None:
        self.state = "up"
        self.engine = type("E", (), {"caps": Capabilities(reads_tap=True, runs_turns=True)})()
        self.journal = type("J", (), {"space": lambda self: 10})()
        self.transport_generation = 0
        self.transport = type("T", (), {"poll_fds": lambda self: ()})()
        self.runs = 0
        self.rx_modes: list[tuple[Any, int]] = []
        self.mtus: list[int] = []
        self.last_error = ""
        self.driver = type("D", (), {"soft": type("S", (), {"mtu": 1500})()})()

    def runs_in_c(self) -> bool:
        return True

    def keeps_tx_clock(self) -> bool:
        return False

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        self.runs += 1
        select.select([wake_fd], [], [], min(timeout, 0.01))
        return 0

    def xmit(self) -> int:
        return 0

    def poll(self, timeout: float = 0.0) -> int:   # the Python turn, in a turn that began while down
        return 0

    def check_tx_progress(self, now: float | None = None) -> bool:
        return True

    def set_rx_mode(self, mode: Any) -> None:
        self.rx_modes.append((mode, threading.get_ident()))

    def set_mtu(self, mtu: int) -> None:
        self.mtus.append(mtu)
        raise UdrvError(f"MTU {mtu}: this device takes 1500 at most")


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

        self.loop_thread: int | None = None
        self.turns = threading.Semaphore(0)   # with `stepped`: each release lets one watch read through
        self.stepped = False
        self.carrier: list[bool] = []

    def host_config(self) -> HostConfig:
        me = threading.get_ident()
        if me == self.loop_thread:             # the loop's own re-read after a refusal: never held
            return self.config
        self.readers.add(me)
        self.reading.set()
        if self.stepped:
            self.turns.acquire(timeout=10)
        else:
            self.gate.wait(10)
        return self.config

    def set_mtu(self, mtu: int) -> None:       # the loop setting the TAP back after a refusal
        self.config = HostConfig(**{**self.config.__dict__, "mtu": mtu})

    def set_carrier(self, up: bool) -> None:
        self.carrier.append(up)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def run_daemon(nic: RingNic, tap: SlowTap) -> tuple[Daemon, threading.Thread]:
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=0.02, tx_progress=3600))  # type: ignore[arg-type]
    d._placement.enabled = False
    d._applied = BASE
    t = threading.Thread(target=d.run, args=(20.0,), daemon=True)
    t.start()
    tap.loop_thread = t.ident
    return d, t


def wait_until(pred, what: str) -> None:
    end = time.monotonic() + 5
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def stop(d: Daemon, t: threading.Thread, tap: SlowTap) -> None:
    tap.gate.set()
    for _ in range(100):
        tap.turns.release()
    d.stop()
    t.join(10)
    d._wake.close()
    tap.close()
    assert not t.is_alive()


def test_a_value_the_host_sets_again_after_a_refusal_is_applied_again():
    nic, tap = RingNic(), SlowTap()
    tap.stepped = True
    tap.config = HostConfig(**{**BASE.__dict__, "mtu": 9000})
    d, t = run_daemon(nic, tap)
    try:
        tap.turns.release()                     # the watch reads MTU 9000
        wait_until(lambda: nic.mtus == [9000], "the driver to be asked for MTU 9000")
        # refused: the loop set the TAP back to 1500 and took that as applied
        wait_until(lambda: tap.config.mtu == 1500 and d._applied is tap.config, "the TAP set back")
        # the host asks for 9000 again before the watch saw the 1500: its read equals its last one
        tap.config = HostConfig(**{**BASE.__dict__, "mtu": 9000})
        tap.turns.release()
        wait_until(lambda: nic.mtus == [9000, 9000], "the second request to reach the driver")
    finally:
        stop(d, t, tap)


def test_a_change_made_while_the_device_is_down_is_applied_once_it_is_back():
    nic, tap = RingNic(), SlowTap()
    tap.stepped = True
    d, t = run_daemon(nic, tap)
    try:
        wait_until(lambda: nic.runs > 0, "the loop's first turn")
        nic.state = "down"
        wait_until(lambda: tap.carrier == [False], "the loop to see the device down")
        tap.config = HostConfig(**{**BASE.__dict__, "promisc": True})
        tap.turns.release()
        tap.turns.release()                     # two reads: the loop had its turns meanwhile
        wait_until(lambda: tap.turns._value == 0, "the watch to read twice")
        time.sleep(0.1)
        assert nic.rx_modes == []               # nothing sent to a device that is not there
        nic.state = "up"
        tap.turns.release()
        wait_until(lambda: len(nic.rx_modes) == 1, "the change to reach the driver")
        assert nic.rx_modes[0][0].promisc
    finally:
        stop(d, t, tap)


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
        stop(d, t, tap)
    assert len(nic.rx_modes) == 1          # applied once, not on every look


class LongTurnNic(RingNic):
    """Sleeps its whole turn unless the wake fd becomes readable."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        self.runs += 1
        if select.select([wake_fd], [], [], timeout)[0]:
            self.woken += 1
        return 0


def test_a_changed_tap_configuration_wakes_the_loop_out_of_a_long_turn():
    nic, tap = LongTurnNic(), SlowTap()
    tap.gate.set()
    d = Daemon(nic, tap, timers=DaemonTimers(link_check=3600, host_sync=0.02, tx_progress=3600,  # type: ignore[arg-type]
                                             ring_turn=60))
    d._placement.enabled = False
    d._applied = BASE
    t = threading.Thread(target=d.run, args=(20.0,), daemon=True)
    t.start()
    tap.loop_thread = t.ident
    try:
        time.sleep(0.1)                        # reads equal to what was applied wake nothing
        assert nic.woken == 0
        tap.config = HostConfig(**{**BASE.__dict__, "promisc": True})
        wait_until(lambda: nic.rx_modes, "the change to reach the driver")   # long before 60 s
        assert nic.woken >= 1 and nic.rx_modes[0][0].promisc
    finally:
        stop(d, t, tap)


def test_hostwatch_counts_reads_skips_failed_ones_and_ticks_on_its_own_period():
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

    w = HostWatch(read, lambda: ticks.append(1), read_period=0.005, tick_period=0.01).start()
    try:
        assert done.wait(5)
        time.sleep(0.05)
    finally:
        w.stop()
    # every read that returned counts (5 of the first 7); the failed read and the raising one
    # did not end the thread (it went on to read 3 and more)
    assert w.latest == 3 and w.reads >= 5
    assert ticks


def test_the_housekeeping_thread_carries_its_name_in_the_kernel() -> None:
    """top and the benches' CPU per thread tell it from the loop by the kernel's name."""
    seen: list[str] = []
    watch = HostWatch(lambda: seen.append(open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()),
                      lambda: None, read_period=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.stop()
    assert seen and seen[0] == "udrv-hostwatch"


@pytest.mark.root
def test_the_tap_read_sees_a_multicast_group_the_host_joins_and_leaves() -> None:
    import subprocess
    from udrv.tap import Tap
    tap = Tap(f"udrvh{os.getpid() % 100000}")
    group = bytes.fromhex("01005e0a0b0c")
    try:
        tap.set_up(True)
        before = tap.host_config().multicast
        assert group not in before and all(len(m) == 6 for m in before)
        subprocess.run(["ip", "maddr", "add", "01:00:5e:0a:0b:0c", "dev", tap.name], check=True)
        assert group in tap.host_config().multicast
        subprocess.run(["ip", "maddr", "del", "01:00:5e:0a:0b:0c", "dev", tap.name], check=True)
        # (the host may join groups of its own meanwhile: IPv6 solicited-node ones after link up)
        assert group not in tap.host_config().multicast
    finally:
        tap.close()
