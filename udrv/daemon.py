"""The supervised daemon: one TAP, one NIC, one event loop, one control socket.

The daemon owns the TAP fd for its whole life (the host interface never disappears), feeds
TAP frames into the NIC's journal, moves completions, mirrors the host's configuration into
the driver, runs the link watchdog and the TX-hang detector, and answers `udrv status` /
`udrv inject` on a unix socket. Recoveries are logged as they happen.
"""
from __future__ import annotations

import json
import math
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .driver import LinkState, RxMode
from .control import listen, unlisten
from .errors import UdrvError
from .hostwatch import HostWatch
from .placement import Priority, SoftirqAvoider
from .nic import DomainState, Nic, Takeover
from .tap import HostConfig, Tap

log = logging.getLogger("udrv.daemon")

@dataclass
class DaemonTimers:
    link_check: float = 1.0
    host_sync: float = 0.25       # how often the housekeeping thread reads the TAP's configuration
    tx_progress: float = 0.05     # TX hang checks, for a datapath that keeps no hang clock itself
    tap_batch: int = 64
    device_poll: float = 0.001    # ring polling period for devices that offer no event fd
    # Longest C ring loop between Python turns. The loop comes back early for everything that
    # needs Python (control requests, a changed TAP configuration, interrupt packets, errors, a
    # TX stall on a ring that keeps its own hang clock), so this only bounds how late the other
    # timers run; each turn parks the ring's TX thread for ~2 ms of Python in a TCG guest, so
    # at 20 turns a second the datapath would stand still 5 % of the time.
    ring_turn: float = 0.25
    # under a supervisor: the loop goes round at least this often, idle or not (its heartbeat,
    # udrv/heartbeat.py); None = no heartbeat
    beat: float | None = None


class Daemon:
    def __init__(self, nic: Nic, tap: Tap, *, timers: DaemonTimers | None = None,
                 extra_fds: dict[int, Callable[[], None]] | None = None,
                 on_tick: Callable[[], None] | None = None, model: Any = None, serve_control: bool = True):
        """serve_control=False: no control socket (a worker: its supervisor owns the socket and
        forwards requests, which handle_request answers)."""
        self.nic = nic
        self.model = model
        self.tap = tap
        self.timers = timers or DaemonTimers()
        self.extra_fds = extra_fds or {}
        self.on_tick = on_tick
        self.running = False
        self.serve_control = serve_control
        self._applied: HostConfig | None = None
        self._ctrl: socket.socket | None = None
        self._poller = select.poll()
        self._tap_registered = False
        # one fd that is readable when any fd Python serves is: the wake fd of the C ring loop
        self._wake = select.epoll()
        # brings the loop out of the C ring at once: written by the housekeeping thread when the
        # TAP's configuration differs from what the loop applied (no timer to look), and by stop()
        self._nudge = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # off the CPUs busy with the kernel's interrupt work for the device (udrv/placement.py)
        self._placement = SoftirqAvoider()
        self._priority = Priority()
        self._watch: HostWatch[HostConfig] | None = None

    # --- setup -------------------------------------------------------------------------------
    def start(self) -> None:
        """Bring the device up and make the TAP look like it (MAC, MTU, carrier)."""
        self._prepare()
        self.nic.bring_up()
        self.tap.set_mac(self.nic.mac)
        self.tap.set_mtu(self.nic.driver.soft.mtu)
        self.tap.set_up(True)
        self.nic.open()
        self._applied = self.tap.host_config()
        self._sync_host_config(force_mode=True)
        link = self.nic.link_check()
        self.tap.set_carrier(link.up)
        if self.serve_control:
            self._open_control()
        log.info("event=up ifname=%s ifindex=%d driver=%s device=%s mac=%s link=%s",
                 self.tap.name, self.tap.ifindex, self.nic.driver.name,
                 self.nic.transport.info.ident, self.nic.status()["mac"], "up" if link.up else "down")

    def take_over(self, state: DomainState) -> Takeover:
        """Start on a device another worker drove (Nic.adopt): the TAP keeps its configuration;
        whatever the host changed on it meanwhile is applied after the restore."""
        self._prepare()
        done = self.nic.adopt(state)
        if not self.nic.driver.soft.opened:
            self.nic.open()              # the worker before died before its open: the interface is up
        soft = self.nic.driver.soft
        mode = soft.mode
        self._applied = HostConfig(self.nic.mac, soft.mtu, True, mode.promisc, mode.allmulti, tuple(sorted(mode.multicast)))
        self._sync_host_config()
        log.info("event=took-over ifname=%s driver=%s implementation=%s how=%s reissued=%d restore=%.2f ms",
                 self.tap.name, self.nic.driver.name, self.nic.driver_cls.__name__, done.how, done.reissued,
                 done.restore_ms)
        return done

    def _prepare(self) -> None:
        self._priority.apply()
        # the loop, back from a C ring turn, waits for the interpreter lock while the housekeeping
        # thread runs Python: by default up to 5 ms of a datapath standing still, 1 ms at most here
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))

    def _open_control(self) -> None:
        self._ctrl = listen(self.tap.name)

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, duration: float | None = None) -> None:
        self.running = True
        end = None if duration is None else time.monotonic() + duration
        p = self._poller
        self._register_tap(self._python_reads_tap())
        self._transport_fds = self._register_transport(set(), -1)
        if self._ctrl is not None:
            p.register(self._ctrl.fileno(), select.POLLIN)
            self._wake_on(self._ctrl.fileno())
        for fd in self.extra_fds:
            p.register(fd, select.POLLIN)
            self._wake_on(fd)
        p.register(self._nudge, select.POLLIN)
        self._wake_on(self._nudge)
        t = time.monotonic()
        next_link, next_tx = t + self.timers.link_check, t
        # TAP configuration and CPU placement are read on a thread of their own (udrv/hostwatch.py):
        # the datapath does not stand still for them; a changed configuration is applied here
        watch = self._watch or self.start_housekeeping()
        watch.resume()
        try:
            self._loop(end, watch, next_link, next_tx)
        finally:
            watch.stop()
            self._watch = None

    def start_housekeeping(self, paused: bool = False) -> HostWatch[HostConfig]:
        """The housekeeping thread (paused: it waits for run(); a warm spare has it ready)."""
        if self._watch is None:
            self._watch = HostWatch(lambda: self.tap.host_config(), self._placement.tick,
                                    read_period=self.timers.host_sync, tick_period=self.timers.link_check,
                                    on_read=self._host_read).start(paused)
        return self._watch

    def _host_read(self, cur: HostConfig) -> None:
        """The housekeeping thread's read: wake the loop if it differs from what was applied."""
        if cur != self._applied:
            os.eventfd_write(self._nudge, 1)

    def _loop(self, end: float | None, watch: HostWatch, next_link: float, next_tx: float) -> None:
        p, nic, tap = self._poller, self.nic, self.tap
        seen = 0                     # the watch's reads the loop has looked at
        generation = self.nic.transport_generation
        state = self.nic.state
        busy = False
        beat = self.timers.beat
        while self.running:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            in_c = nic.state == "up" and nic.runs_in_c()
            # a ring that keeps its own TX hang clock comes back when TX stalls: no timer for it
            clocked = in_c and nic.keeps_tx_clock()
            wait = (next_link if clocked else min(next_link, next_tx)) - now
            if beat is not None and not (in_c and nic.engine.caps.beats):
                wait = min(wait, beat)          # back here to beat (a loop in C that beats runs on)
            if in_c:
                # the ring sleeps in C on USB, the TAP and the wake fd (control socket, extra
                # fds) and moves frames without a Python turn; back here for timers and requests
                nic.run(max(0.0, min(wait, self.timers.ring_turn)), self._wake.fileno())
                events = p.poll(0)
            else:
                if not self._transport_fds:
                    # a polled device (PCI without interrupts): look at its rings every millisecond,
                    # at once while the last look found work (frames keep coming: sleeping would
                    # leave the CPU idle while the device fills the ring)
                    wait = min(wait, 0 if busy else self.timers.device_poll)
                events = p.poll(max(0, math.ceil(wait * 1000)))
            for fd, _ev in events:
                if fd == tap.fd:
                    caps = nic.engine.caps
                    if caps.reads_tap:
                        # the C ring reads the TAP itself, inside xmit(); while the NIC is not
                        # up xmit() is not called: journal the frames now (as Python would)
                        if nic.state != "up" and caps.pulls_tap:
                            nic.engine.pull_tap()
                    elif nic.journal.space() > 0:
                        nic.pull_tap(tap, self.timers.tap_batch)
                elif self._ctrl is not None and fd == self._ctrl.fileno():
                    self._serve_control()
                elif fd in self.extra_fds:
                    self.extra_fds[fd]()
                elif fd == self._nudge:
                    os.eventfd_read(self._nudge)   # looked at below (watch.reads, running)
            busy = False
            if in_c and nic.state == "up":
                nic.xmit()                    # the xmit entry point (and faults armed for it)
            elif nic.state == "up":
                nic.xmit()
                busy = nic.poll(0.0) > 0
                nic.xmit()
                if busy:
                    self._priority.batch_done()
            if nic.state != state:
                state = nic.state
                if state != "up":             # the host learns at once, not at the next link check
                    tap.set_carrier(False)
                    log.warning("event=down carrier=off (the restart's error is logged above)")
            if nic.transport_generation != generation:
                generation = nic.transport_generation
                self._transport_fds = self._register_transport(self._transport_fds, generation)
            # stop reading the TAP while the journal is full: the kernel queues (backpressure)
            self._register_tap(nic.journal.space() > 0 and self._python_reads_tap())
            now = time.monotonic()
            if clocked or now >= next_tx:
                next_tx = now + self.timers.tx_progress
                if nic.state == "up":
                    up = nic.link.up
                    nic.check_tx_progress(now)
                    if up and not nic.link.up:   # a suspected hang found the link down
                        self._show_link(nic.link, up)
            if watch.reads != seen and nic.state == "up":   # down: applied once the device is back
                seen = watch.reads
                cur = watch.latest
                if cur is not None and cur != self._applied:
                    self._sync_host_config(cur=cur)
            if now >= next_link:
                next_link = now + self.timers.link_check
                self._link_watchdog()
            if self.on_tick:
                self.on_tick()

    def _python_reads_tap(self) -> bool:
        """Whether the loop must wake for TAP frames: not when a ring running in C polls the TAP
        itself, nor while the NIC is down under a ring that reads the TAP but cannot journal
        frames from Python (caps.pulls_tap): the kernel queues them."""
        nic = self.nic
        if nic.state == "up":
            return not nic.runs_in_c()
        caps = nic.engine.caps
        return not caps.reads_tap or caps.pulls_tap

    def _wake_on(self, fd: int) -> None:
        try:
            self._wake.register(fd, select.EPOLLIN)
        except FileExistsError:       # run() called again
            pass

    def _register_transport(self, old: set[int], generation: int) -> set[int]:
        """(Re-)register the transport's poll fds: a reopened device brings new ones."""
        for fd in old:
            try:
                self._poller.unregister(fd)
            except KeyError:
                pass
        fds = set()
        for fd, ev in self.nic.transport.poll_fds():
            self._poller.register(fd, ev)
            fds.add(fd)
        return fds

    def _register_tap(self, want: bool) -> None:
        if want and not self._tap_registered:
            self._poller.register(self.tap.fd, select.POLLIN)
            self._tap_registered = True
        elif not want and self._tap_registered:
            self._poller.unregister(self.tap.fd)
            self._tap_registered = False

    def stop(self, *_: Any) -> None:
        self.running = False
        if self._nudge >= 0:             # else closed already: nothing runs to be woken
            os.eventfd_write(self._nudge, 1)

    # --- periodic work -----------------------------------------------------------------------------
    def _link_watchdog(self) -> None:
        if self.nic.state == "down":
            self.tap.set_carrier(False)
            try:
                self.nic.restart()
                log.info("event=device-back state=up")
            except UdrvError as e:
                self.nic.last_error = str(e)
                return
        before = self.nic.link.up
        try:
            link = self.nic.link_check()
        except UdrvError as e:
            log.warning("event=link-check-failed error=%s", e)
            return
        self._show_link(link, before)

    def _show_link(self, link: LinkState, before: bool) -> None:
        """The TAP's carrier follows the device's link (the host stops sending without it)."""
        if link.up != before:
            log.info("event=link %s speed=%d duplex=%s", "up" if link.up else "down", link.speed,
                     "full" if link.full_duplex else "half")
        self.tap.set_carrier(link.up)

    def _sync_host_config(self, force_mode: bool = False, cur: HostConfig | None = None) -> None:
        """Mirror what the host configured on the TAP (`cur`, else read now) into the driver (and
        log it for replay)."""
        if self.nic.state != "up":
            return          # picked up once the device is back (the comparison is against _applied)
        if cur is None:
            try:
                cur = self.tap.host_config()
            except OSError:
                return
        old = self._applied
        assert old is not None
        try:
            if cur.mac != old.mac:
                try:
                    self.nic.set_mac(cur.mac)
                except UdrvError as e:
                    log.error("event=config-refused what=mac error=%s", e)
                    self.tap.set_mac(self.nic.mac)
                    cur = self.tap.host_config()
            if cur.mtu != old.mtu:
                try:
                    self.nic.set_mtu(cur.mtu)
                except UdrvError as e:
                    log.error("event=config-refused what=mtu error=%s", e)
                    self.tap.set_mtu(self.nic.driver.soft.mtu)
                    cur = self.tap.host_config()
            if force_mode or (cur.promisc, cur.allmulti, cur.multicast) != (old.promisc, old.allmulti, old.multicast):
                try:
                    self.nic.set_rx_mode(RxMode(cur.promisc, cur.allmulti, cur.multicast))
                except UdrvError as e:
                    log.error("event=config-refused what=rx_mode error=%s", e)
        except ValueError as e:          # a driver refusing a value (e.g. MTU range)
            log.error("event=config-refused error=%s", e)
            self.tap.set_mtu(self.nic.driver.soft.mtu)
            cur = self.tap.host_config()
        self._applied = cur

    # --- control socket ---------------------------------------------------------------------------
    def _serve_control(self) -> None:
        assert self._ctrl is not None
        while True:
            try:
                conn, _ = self._ctrl.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    reply = self.handle_request(json.loads(data or b"{}"))
                except (OSError, ValueError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        try:
            if cmd == "status":
                st = self.nic.status()
                st["ifname"], st["ifindex"] = self.tap.name, self.tap.ifindex
                st["recent_recoveries"] = [r.as_dict() for r in self.nic.recoveries[-10:]]
                return {"ok": True, "status": st}
            if cmd == "inject":
                self.nic.inject(str(req["entry"]), str(req["kind"]), int(req.get("count", 1)))
                return {"ok": True}
            if cmd == "device":
                return self._device_knob(str(req.get("action", "")))
            if cmd == "restart":
                ms = self.nic.restart()
                return {"ok": True, "restart_ms": ms}
            if cmd == "aqm":
                now = self.nic.aqm_settings()
                target = float(req.get("target_ms", now["target_ms"])) / 1e3
                interval = float(req.get("interval_ms", now["interval_ms"])) / 1e3
                return {"ok": True, "aqm": self.nic.set_aqm(target, interval, bool(req.get("ecn", now["ecn"])))}
            return {"ok": False, "error": f"unknown command {cmd!r}: use status, inject, restart or aqm"}
        except (UdrvError, KeyError, ValueError) as e:
            return {"ok": False, "error": str(e)}

    def _device_knob(self, action: str) -> dict[str, Any]:
        """Physical events on the embedded model (a real device needs a real hand)."""
        m = self.model
        if m is None:
            return {"ok": False, "error": "device events exist only for the embedded model: unplug the real "
                                          "device by hand"}
        from .models.catalog import device_event
        error = device_event(m, action)
        if error is not None:
            return {"ok": False, "error": error}
        return {"ok": True}

    def close(self) -> None:
        self._placement.restore()
        self._priority.restore()
        self._wake.close()
        os.close(self._nudge)
        self._nudge = -1                 # a later stop() must not write to a reused fd number
        if self._ctrl is not None:
            unlisten(self.tap.name, self._ctrl)
        self.nic.close()
        log.info("event=stopped ifname=%s", self.tap.name)


def install_signal_handlers(daemon: Daemon) -> None:
    signal.signal(signal.SIGINT, daemon.stop)
    signal.signal(signal.SIGTERM, daemon.stop)
