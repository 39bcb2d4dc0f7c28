"""The supervisor: a small trusted process that keeps the interface while drivers come and go.

`udrv run` (unless --in-process) is this process. It holds what must outlive a driver: the
TAP (so `udrv0` keeps its name and ifindex), the TX journal memfd, the heartbeat page, the
last checkpoint (opaque bytes it never decodes), the control socket, counters and policy. The
driver runs in a worker process (udrv/worker.py) beside a warm spare; an embedded model runs
in a device process (udrv/devicehost.py). It imports no driver and no model.

Detection (Policy holds the thresholds):
  * a worker that dies: its life lock comes back owner-died as it begins to exit
    (udrv/lifelock.py), or its pidfd becomes readable once it has;
  * a worker that freezes (stopped, spinning, deadlocked, stuck in a call): its heartbeat is
    older than `heartbeat_timeout` and no configuration call of it is inside its deadline;
  * a datapath standing still while frames wait: the worker's own TX hang watch, in process.
Recovery: the frozen worker is killed and its exit seen (it runs no code of its own again; the
device process drops its connection; a real USB device waits for the dead worker's file to
close, which ends its claims and transfers), then the spare is promoted: it restores the
device from the last checkpoint, re-issues what the journal holds unconfirmed and replays the
configuration. A new
spare starts once the promoted one is up. Which implementation runs, back-off and giving up are
udrv/failover.py's; given up, the supervisor keeps the interface with its carrier off and says
why in the log and in `udrv status`.
The one fault it does not survive is its own crash.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .channel import Channel, ChannelClosed, pair
from .control import listen, unlisten
from .errors import UdrvError
from .failover import Failover, FailureLedger, Policy
from .heartbeat import SLOTS, HeartbeatPage
from . import lifelock
from .journal import TxJournal
from .tap import Tap

log = logging.getLogger("udrv.supervisor")


# a worker's request served: the reply's fields, fds to send with it, fds to close once sent
Answer = tuple[dict[str, Any], list[int], list[int]]


@dataclass
class Child:
    popen: subprocess.Popen
    channel: Channel
    pidfd: int
    slot: int
    role: str                    # spare | primary
    implementation: str = ""     # asked for (a name); "" = the first
    state: str = "starting"      # starting | hello | arming | idle | taking-over | running
    armed: bool = False          # holds its device connection, the TAP, the journal, a built driver
    started: float = field(default_factory=time.monotonic)
    up_at: float = 0.0
    implementations: list[str] = field(default_factory=list)
    stale_oncpu: int | None = None   # the loop thread's CPU time (ns) when its heartbeat was first seen stale
    seen_state: str = ""             # the loop thread's state (/proc) when it was found stuck
    watch: lifelock.DeathWatch | None = None
    state_given: str | None = None   # the checkpoint blob this spare already has

    @property
    def pid(self) -> int:
        return self.popen.pid


def _loop_thread(pid: int) -> tuple[bytes, int] | None:
    """The state letter (/proc: R, S, D, T...) of a worker's loop thread (its main thread) and
    the CPU time it has had (ns); None when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/task/{pid}/schedstat", "rb") as f:
            return state, int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cause(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"


def _exit_cause(pid: int) -> str:
    """How an exiting process ends, before it is reaped: its exit code is in /proc/PID/stat
    (field 52) from the start of its exit."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            code = int(f.read().rsplit(b")", 1)[1].split()[49])
    except (OSError, ValueError, IndexError):
        return "exiting"
    sig = code & 0x7F
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {code >> 8}"


def _hand(c: Child, msg: dict[str, Any], fds: list[int], close: list[int]) -> None:
    """Send msg with fds to a child, then close the fds in `close` (ours once sent, or not): a
    child that is gone cannot take them, and its pidfd says the rest."""
    try:
        c.channel.send(msg, fds)
    except ChannelClosed:
        pass
    finally:
        for fd in close:
            os.close(fd)


def _renice(pid: int, nice: int) -> None:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except OSError:
        pass


COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_errors", "tx_errors", "tap_frames_in",
            "recoveries", "escalations", "restarts", "swaps")


class Supervisor:
    def __init__(self, device: dict[str, Any], options: dict[str, Any], ifname: str = "udrv0",
                 policy: Policy | None = None, impl: str | None = None):
        self.device = dict(device)
        self.options = options
        self.policy = policy or Policy()
        self.impl = impl
        self.tap = Tap(ifname)
        self.page = HeartbeatPage()
        self.journal: TxJournal | None = None
        self.devhost: Channel | None = None
        self.devhost_proc: subprocess.Popen | None = None
        self.node: Any = None                     # a real USB device: udrv.usbnode.UsbNode
        self.vfio: Any = None                     # a real PCI device: udrv.vfionode.VfioNode
        self.peer: dict[str, Any] | None = None
        self.primary: Child | None = None
        self.spare: Child | None = None
        self.children: list[Child] = []
        self.state_blob: str | None = None
        self.failovers: list[Failover] = []       # the last 100
        self.failover_count = 0
        self.pending_failover: Failover | None = None
        self.failures = FailureLedger(self.policy)
        self.running = False
        self._tap_attached = False
        self._carrier = False
        self._ctrl: socket.socket | None = None
        self._pending: dict[int, tuple[socket.socket, dict[str, Any], float]] = {}
        self._req_id = 0
        self._last_status: dict[str, Any] = {}
        self._carried: dict[str, int] = {}
        self._carried_recoveries: list[dict[str, Any]] = []     # dead workers' last in-process recoveries
        self._recoveries_of: dict[int, list[dict[str, Any]]] = {}   # pid -> its recoveries, as it reported them
        self._next_status_poll = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._deaths: deque[int] = deque()       # pids whose life lock came back (DeathWatch threads)
        self.dying: list[Child] = []              # lost, not yet reaped: their pidfds say when
        self._watches: dict[int, lifelock.DeathWatch] = {}   # slot -> the watch that last waited there
        self._start_after_reap: int = 0           # a real USB device: the successor waits for this pid's exit

    # --- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.device["kind"] == "model":
            self._start_devhost()
        elif self.device["kind"] == "usb":
            from .libusb import UsbSelector
            from .usbnode import UsbNode
            self.node = UsbNode(UsbSelector.parse(self.device["spec"]))
            self.device["bus"] = "usb"
            log.info("event=usb-device %s node=%s kernel_bound=%s", self.node.ident, self.node.path,
                     sorted(self.node.kernel_bound) or "none")
        elif self.device["kind"] == "pci":
            from .vfionode import VfioNode
            self.vfio = VfioNode(self.device["bdf"])
            self.device["bus"] = "pci"
            log.info("event=pci-device %s bdf=%s (container and group held here)", self.vfio.info.ident,
                     self.vfio.info.bdf)
        self._open_control()
        self._spawn("primary", self.impl or "")
        log.info("event=supervisor pid=%d ifname=%s ifindex=%d device=%s", os.getpid(), self.tap.name,
                 self.tap.ifindex, self.device.get("spec"))

    def _start_devhost(self) -> None:
        mine, theirs = pair()
        args = [sys.executable, "-m", "udrv.devicehost", "--channel", str(theirs.fileno()),
                "--model", self.device["model"], "--ifname", self.tap.name]
        if self.device.get("wire_mbit") is not None:
            args += ["--wire-mbit", str(self.device["wire_mbit"]), "--wire-delay-ms",
                     str(self.device.get("wire_delay_ms", 0.0))]
        self.devhost_proc = subprocess.Popen(args, pass_fds=[theirs.fileno()])
        theirs.close()
        self.devhost = Channel(mine)
        try:
            msg, _ = self.devhost.recv(timeout=30)
        except (TimeoutError, ChannelClosed):
            raise UdrvError("the embedded model's device process did not start: see its error above") from None
        self.device["bus"] = msg["bus"]
        self.peer = msg["peer"]

    def _open_control(self) -> None:
        self._ctrl = listen(self.tap.name)

    def _free_slot(self) -> int:
        """A slot nobody uses, whose life lock nobody waits for any more (one that a watch still
        waits on must not be re-initialised under it)."""
        used = {c.slot for c in self.children + self.dying}
        used |= {i for i, w in self._watches.items() if w.waiting}
        return next(i for i in range(SLOTS) if i not in used)

    def _spawn(self, role: str, implementation: str) -> Child:
        mine, theirs = pair()
        env = dict(os.environ)
        # a spare starts at a low priority: its interpreter's start-up must not take the CPU the
        # running worker needs (at promotion the worker sets its own, udrv/placement.py)
        popen = subprocess.Popen([sys.executable, "-m", "udrv.worker", "--channel", str(theirs.fileno())],
                                 pass_fds=[theirs.fileno()], env=env,
                                 preexec_fn=(lambda: os.nice(10)) if role == "spare" else None)
        theirs.close()
        slot = self._free_slot()
        self.page.clear(slot)
        if lifelock.available():
            lifelock.init(self.page.life_address(slot))
        child = Child(popen, Channel(mine), os.pidfd_open(popen.pid), slot, role, implementation)
        self.children.append(child)
        # a real USB device: the worker's own usbfs file now (it picks its driver from the
        # descriptors); it claims nothing before it is started
        own = ([self.node.open_for_worker()] if self.node is not None else
               [self.vfio.device_fd_for_worker()] if self.vfio is not None else [])
        try:
            child.channel.send({"t": "init", "slot": slot, "device": self.device, "options": self.options,
                                "impl": self.impl}, [self.page.fd, *own])
        finally:
            for fd in own:
                os.close(fd)
        if role == "primary":
            self.primary = child
        else:
            self.spare = child
        return child

    # --- the loop --------------------------------------------------------------------------------
    def run(self, duration: float | None = None) -> None:
        self.running = True
        end = None if duration is None else time.monotonic() + duration
        p = self.policy
        while self.running:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            fds = [self._wake_r]
            if self._ctrl is not None:
                fds.append(self._ctrl.fileno())
            if self.devhost is not None:
                fds.append(self.devhost.fileno())
            for c in self.children:
                fds += [c.channel.fileno(), c.pidfd]
            fds += [c.pidfd for c in self.dying]
            watching = self.primary is not None and self.primary.state == "running"
            timeout = min(p.heartbeat_timeout / 3, p.stopped_check / 2) if watching else 0.05
            r, _, _ = select.select(fds, [], [], timeout)
            readable = set(r)
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            while self._deaths:
                self._died(self._deaths.popleft())
            for c in list(self.children):
                if c.pidfd in readable:
                    self._exited(c)
                elif c.channel.fileno() in readable:
                    self._serve_child(c)
            for c in list(self.dying):
                if c.pidfd in readable:
                    self._reaped(c)
            if self._ctrl is not None and self._ctrl.fileno() in readable:
                self._accept()
            if self.devhost is not None and self.devhost.fileno() in readable:
                self._serve_devhost()
            self._watch(time.monotonic())

    def _watch(self, now: float) -> None:
        p = self.policy
        c = self.primary
        if c is not None:
            hb = self.page.slot(c.slot)
            if c.state == "running":
                stale = hb.stale_for()
                deadline = hb.deadline_ns / 1e9
                if stale > p.heartbeat_timeout:
                    # inside a call with a deadline of its own the worker may sleep or compute; it
                    # may not be stopped
                    within = bool(deadline) and now <= deadline + p.config_grace
                    if self._stuck(c, stale, only_stopped=within):
                        self._frozen(c, stale)
                else:
                    c.stale_oncpu = None
                    # a stopped loop is frozen whatever it was doing: no need to wait the timeout
                    # out (a tracer's stop, t, gets the timeout: a sampling profiler stops it briefly)
                    if stale > p.stopped_check and (st := _loop_thread(c.pid)) is not None and st[0] == b"T":
                        c.seen_state = "T"
                        self._frozen(c, stale)
            elif c.state == "taking-over" and now - c.started > p.takeover_timeout:
                self._frozen(c, now - c.started)
            elif c.state == "starting" and now - c.started > p.start_timeout:
                self._frozen(c, now - c.started)
        elif not self.failures.gave_up and now >= self.failures.next_start and not self._start_after_reap:
            self._start_successor(self.pending_failover)
        if self.spare is None and self.primary is not None and self.primary.state == "running" \
                and not self.failures.gave_up and now >= self.failures.next_start:
            self._spawn("spare", self.failures.current)
        elif self.spare is not None and self.spare.state == "hello":
            self._arm(self.spare)
        pref = self.failures.swap_back(now)
        if pref and self.spare is not None and self.spare.implementation != pref:
            self._retire(self.spare)
        f = self.pending_failover
        if f is not None:
            running = self.primary is not None and self.primary.state == "running"
            progress = self.page.slot(self.primary.slot).progress_ns if running else 0
            if running and f._progress_before and progress > f._progress_before and f.failover_ms is not None:
                f.silent_ms = (progress - f._progress_before) / 1e6
                self._log_failover(f)
            elif now - f._t_detect > 2.0:
                self._log_failover(f)
        self._expire_requests(now)
        if now >= self._next_status_poll and self.primary is not None and self.primary.state == "running":
            self._next_status_poll = now + 1.0
            self._forward(None, {"cmd": "status"})      # the counters a failover carries over

    def _log_failover(self, f: Failover) -> None:
        log.warning("%s", f.line())
        self.pending_failover = None

    # --- children ------------------------------------------------------------------------------
    def _serve_child(self, c: Child) -> None:
        try:
            messages = c.channel.poll()
        except ChannelClosed:
            return                           # its pidfd says the rest
        for msg, fds in messages:
            t = msg.get("t")
            if t == "tap":
                self._tap_request(c, msg)
            elif t == "journal":
                self._journal_request(c, msg)
            elif t == "device":
                self._reopen_request(c, msg)
            elif t == "dma":
                self._dma_request(c, msg)
            elif t == "recovery" and isinstance(msg.get("rec"), dict):
                self._recoveries_of.setdefault(c.pid, []).append(msg["rec"])
                del self._recoveries_of[c.pid][:-10]
            elif t == "state" and c is self.primary and isinstance(msg.get("blob"), str):
                self.state_blob = msg["blob"]
                self._pass_state()
            elif t == "hello":
                c.implementations = [str(n) for n in msg.get("implementations", [])]
                self.failures.named(c.implementations)
                if not c.implementation:
                    c.implementation = self.failures.current
                c.state = "hello"
                self._watch_life(c)
                if c is self.primary:
                    self._send_start(c)
                else:
                    self._arm(c)
            elif t == "armed":
                c.armed = True
                if c.state == "arming":
                    c.state = "idle"
            elif t == "up":
                self._up(c, msg)
            elif t == "reply":
                self._answer(msg)
            for fd in fds:
                os.close(fd)

    def _arm(self, c: Child) -> None:
        """A spare gets its own device connection and builds its driver while it waits (once the
        TAP and the journal exist: the first worker's request sets them up)."""
        if c.state != "hello" or not self._tap_attached or self.journal is None:
            return
        fds = self._device_fds(c.pid)
        _hand(c, {"t": "arm", "implementation": c.implementation,
                  "tap": {"name": self.tap.name, "ifindex": self.tap.ifindex}}, fds, fds)
        c.state = "arming"
        self._pass_state()

    def _pass_state(self) -> None:
        """The spare gets each checkpoint as it is taken, and decodes it while it waits: the
        start message then carries none."""
        s = self.spare
        if s is not None and s.state in ("arming", "idle") and self.state_blob is not None \
                and s.state_given is not self.state_blob:
            try:
                s.channel.send({"t": "state", "blob": self.state_blob})
                s.state_given = self.state_blob
            except ChannelClosed:
                pass

    def _send_start(self, c: Child) -> None:
        adopt = self.state_blob is not None
        given = adopt and c.state_given is self.state_blob
        msg = {"t": "start", "mode": "adopt" if adopt else "fresh", "state": None if given else self.state_blob,
               "implementation": c.implementation, "tap": {"name": self.tap.name, "ifindex": self.tap.ifindex}}
        # out of the spare's low priority, to the daemon's (the worker may not raise its own)
        from .placement import Priority
        _renice(c.pid, Priority().nice)
        fds = [] if c.armed else self._device_fds(c.pid)
        _hand(c, msg, fds, fds)
        c.state = "taking-over"
        c.started = time.monotonic()

    def _device_fds(self, owner: int) -> list[int]:
        """A new open of the device for one worker (a USB worker got its own with init)."""
        if self.devhost is None:
            return []
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.devhost.send({"t": "connect", "owner": owner}, [mine.fileno()])
        mine.close()
        fd = theirs.detach()
        return [fd]

    def _up(self, c: Child, msg: dict[str, Any]) -> None:
        c.state = "running"
        c.up_at = time.monotonic()
        c.implementation = str(msg.get("implementation", c.implementation))
        self.page.slot(c.slot).beat()
        f = self.pending_failover
        if f is not None and f.successor == c.pid:
            f.failover_ms = (c.up_at - f._t_detect) * 1000
            f.successor_implementation = c.implementation
            f.how = str(msg.get("how", ""))
            f.reissued = int(msg.get("reissued", 0))
            f.takeover_ms = float(msg.get("takeover_ms", 0.0))
        log.info("event=worker-up pid=%d implementation=%s how=%s", c.pid, c.implementation, msg.get("how"))

    def _answer_child(self, c: Child, msg: dict[str, Any], serve: Any) -> None:
        """Run one request of a worker (`serve()` -> Answer) and reply to it: ok with what it
        returned, or the error in one sentence. A reply the worker is no longer there to read is
        dropped (its pidfd says the rest)."""
        reply: dict[str, Any] = {"t": "reply", "id": msg.get("id"), "ok": True}
        fds: list[int] = []
        close: list[int] = []
        try:
            fields, fds, close = serve()
            reply.update(fields)
        except (OSError, UdrvError, KeyError, ValueError) as e:
            reply.update(ok=False, error=str(e))
        _hand(c, reply, fds, close)

    def _tap_request(self, c: Child, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "carrier":                   # no answer: the worker does not wait for one
            if c is self.primary:
                self._set_carrier(bool(msg["on"]))
            return

        def serve() -> Answer:
            if op == "attach":
                if not self._tap_attached:
                    # the first worker's wish decides: the queue cannot change while a worker holds it
                    self.tap.set_offloads(msg.get("offloads", []), vnet_hdr=bool(msg.get("vnet_hdr")))
                    self._tap_attached = True
                return {"vnet_hdr_len": self.tap.vnet_hdr_len, "offloads": sorted(self.tap.offloads)}, [self.tap.fd], []
            if op == "mac":
                self.tap.set_mac(bytes.fromhex(str(msg["mac"])))
            elif op == "mtu":
                self.tap.set_mtu(int(msg["mtu"]))
            elif op == "up":
                self.tap.set_up(bool(msg["up"]))
            else:
                raise UdrvError(f"unknown TAP request {op!r}")
            return {}, [], []
        self._answer_child(c, msg, serve)

    def _set_carrier(self, on: bool) -> None:
        self._carrier = on
        self.tap.set_carrier(on)

    def _journal_request(self, c: Child, msg: dict[str, Any]) -> None:
        def serve() -> Answer:
            n, size = int(msg.get("nslots", 0)), int(msg.get("slot_size", 0))
            if self.journal is None:
                self.journal = TxJournal(n, size)
            elif (self.journal.nslots, self.journal.slot_size) != (n, size):
                raise UdrvError(f"the journal has {self.journal.nslots} slots of {self.journal.slot_size} bytes, "
                                f"not {n} of {size}")
            return {}, [self.journal.fd], []
        self._answer_child(c, msg, serve)

    def _dma_request(self, c: Child, msg: dict[str, Any]) -> None:
        """DMA memory for a worker on a VFIO device: mapped into the IOMMU here, so it outlives it."""
        def serve() -> Answer:
            if self.vfio is None:
                raise UdrvError("DMA memory comes from the supervisor only for a vfio-pci device")
            op = msg.get("op")
            if op == "alloc":
                buf = self.vfio.alloc(c.pid, int(msg["size"]), int(msg.get("align", 4096)))
                return {"iova": buf.iova, "mapped": buf.mapped_size, "huge": buf.hugepage}, [buf.fd], []
            if op == "free":
                self.vfio.free(c.pid, int(msg["iova"]))
                return {}, [], []
            if op == "orphans":
                return {"released": self.vfio.release_orphans({k.pid for k in self.children})}, [], []
            raise UdrvError(f"unknown DMA request {op!r}")
        self._answer_child(c, msg, serve)

    def _reopen_request(self, c: Child, msg: dict[str, Any]) -> None:
        """A worker whose device went away asks for a new open (after a replug, a new address)."""
        def serve() -> Answer:
            if self.node is None:
                raise UdrvError("this device is not reopened through the supervisor")
            self.node.find()
            fd = self.node.open_for_worker()
            return {}, [fd], [fd]
        self._answer_child(c, msg, serve)

    # --- failures -------------------------------------------------------------------------------
    def _watch_life(self, c: Child) -> None:
        if not lifelock.available() or c.watch is not None:
            return
        pid = c.pid

        def died() -> None:                  # on the watch's thread
            self._deaths.append(pid)
            try:
                os.write(self._wake_w, b"d")
            except BlockingIOError:
                pass

        c.watch = self._watches[c.slot] = lifelock.DeathWatch(self.page.life_address(c.slot), died)

    def _died(self, pid: int) -> None:
        """A child's life lock came back: it is exiting (not yet reaped)."""
        c = next((c for c in self.children if c.pid == pid), None)
        if c is not None:
            self._lost(c, _exit_cause(pid), "life-lock", reaped=False)

    def _exited(self, c: Child) -> None:
        rc = c.popen.poll()
        if rc is None:
            return      # readiness of an fd number closed and reused earlier in this turn
        self._lost(c, _cause(rc), "pidfd")

    def _reaped(self, c: Child) -> None:
        """A lost child's exit is complete: its files are closed (a usbfs file's claims and URBs
        with them)."""
        rc = c.popen.poll()
        if rc is None:
            return      # as in _exited
        self.dying.remove(c)
        os.close(c.pidfd)
        f = self.pending_failover
        if f is not None and f.pid == c.pid and f.cause == "exiting":
            f.cause = _cause(rc)
        if self._start_after_reap == c.pid:
            self._start_after_reap = 0
            if self.primary is None and not self.failures.gave_up and time.monotonic() >= self.failures.next_start:
                self._start_successor(f)

    def _stuck(self, c: Child, stale: float, only_stopped: bool = False) -> bool:
        """A stale heartbeat means a stuck loop, not a busy host: the loop's thread is stopped
        (T), or asleep blocked_timeout past its beat (S, D: blocked in a call; a shorter sleep is
        also what waiting for the interpreter lock looks like), or it ran on a CPU for a
        heartbeat's timeout since the beat went stale and still did not beat (spinning). Runnable
        but waiting for a CPU, it gets up to starved_timeout."""
        st = _loop_thread(c.pid)
        if st is None:
            return True                   # gone or unreadable: its pidfd or the kill says the rest
        state, oncpu = st
        c.seen_state = state.decode(errors="replace")
        if state in (b"T", b"t"):
            return True
        if only_stopped:
            return False
        if state != b"R":
            return stale > self.policy.blocked_timeout
        if stale > self.policy.starved_timeout:
            return True
        if c.stale_oncpu is None:
            c.stale_oncpu = oncpu
            return False
        return oncpu - c.stale_oncpu > self.policy.heartbeat_timeout * 1e9

    def _frozen(self, c: Child, stale: float) -> None:
        """Kill it and see it gone (its life lock back: it runs no code again) before anyone else
        takes the device."""
        os.kill(c.pid, signal.SIGKILL)
        reaped = not (c.watch is not None and c.watch.join(1.0))
        if reaped:
            c.popen.wait()
        self._lost(c, f"froze (no heartbeat for {stale * 1e3:.1f} ms, thread state {c.seen_state or '?'})",
                   "heartbeat", reaped=reaped)

    def _lost(self, c: Child, cause: str, detected_by: str, reaped: bool = True) -> None:
        """`reaped`: its exit is complete; else it is exiting (it runs no code of its own again)
        and its pidfd is watched until it is gone."""
        now = time.monotonic()
        hb = self.page.slot(c.slot)
        last_beat = hb.beat_ns / 1e9
        progress = hb.progress_ns
        self._forget(c, reaped)
        self._drop_connection(c)
        self._carried_recoveries = (self._carried_recoveries + self._recoveries_of.pop(c.pid, []))[-10:]
        if c is self.spare:
            self.spare = None
            log.warning("event=spare-lost pid=%d %s", c.pid, cause)
            return
        was_primary = c is self.primary
        self.primary = None
        if not was_primary or not self.running:
            return
        impl = c.implementation or self.failures.current
        f = Failover(c.pid, cause, detected_by, impl, detection_ms=max(0.0, now - last_beat) * 1000,
                     idle_before_ms=max(0.0, last_beat - progress / 1e9) * 1000 if progress else 0.0,
                     _t_detect=now, _progress_before=progress)
        if self.failures.failed(impl, c.up_at, now):
            self._set_carrier(False)
        self.failovers.append(f)
        del self.failovers[:-100]
        self.failover_count += 1
        if not self.failures.gave_up:
            self.pending_failover = f
            if self.node is not None and not reaped:
                self._start_after_reap = c.pid       # usbfs: its claims go when its file closes
            elif now >= self.failures.next_start:
                self._start_successor(f)
        # the successor first, then the rest: the full failover line follows when the successor
        # is up (or 2 s have passed)
        log.warning("event=worker-lost pid=%d %s detected_by=%s", c.pid, cause, detected_by)
        self._carry_counters()
        if self.failures.gave_up:
            self._log_failover(f)

    def _start_successor(self, f: Failover | None) -> None:
        s = self.spare
        if s is not None and s.state == "idle" and s.implementation == self.failures.current:
            self.spare = None
            s.role = "primary"
            self.primary = s
            self._send_start(s)
        else:
            if s is not None:             # not ready, or the wrong implementation: a cold start
                self._retire(s)
            s = self._spawn("primary", self.failures.current)
            if f is not None:
                f.spare_ready = False
        if f is not None:
            f.successor = s.pid

    def _retire(self, c: Child) -> None:
        try:
            os.kill(c.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._forget(c, reaped=False)
        self._drop_connection(c)
        if c is self.spare:
            self.spare = None

    def _drop_connection(self, c: Child) -> None:
        """The device process drops a lost worker's connection now, not when the worker's exit
        closes it: its transfers would take frames meant for the successor."""
        if self.devhost is not None:
            try:
                self.devhost.send({"t": "drop", "owner": c.pid})
            except ChannelClosed:
                pass

    def _forget(self, c: Child, reaped: bool = True) -> None:
        if c in self.children:
            self.children.remove(c)
        c.channel.close()
        if reaped:
            os.close(c.pidfd)
        elif c not in self.dying:
            self.dying.append(c)
        self.page.clear(c.slot)

    def _carry_counters(self) -> None:
        st = self._last_status
        for k in COUNTERS:
            if isinstance(st.get(k), int):
                self._carried[k] = self._carried.get(k, 0) + st[k]
        self._last_status = {}

    # --- control requests --------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._ctrl is not None
        while True:
            try:
                conn, _ = self._ctrl.accept()
            except BlockingIOError:
                return
            conn.settimeout(1.0)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                req = json.loads(data)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as e:
                self._reply(conn, {"ok": False, "error": f"bad request: {e}"})
                continue
            self._request(conn, req)

    def _request(self, conn: socket.socket, req: dict[str, Any]) -> None:
        cmd = req.get("cmd")
        if cmd == "inject" and req.get("entry") == "worker":
            self._reply(conn, self._inject_worker(str(req.get("kind"))))
        elif cmd == "device":
            self._device_event(conn, str(req.get("action", "")))
        elif self.primary is None or self.primary.state != "running":
            if cmd == "status":
                self._reply(conn, {"ok": True, "status": self._status({})})
            else:
                why = f"({self.failures.gave_up})" if self.failures.gave_up else "(a failover is in progress): try again"
                self._reply(conn, {"ok": False, "error": f"no worker is running the driver right now {why}"})
        else:
            self._forward(conn, req)

    def _forward(self, conn: socket.socket | None, req: dict[str, Any]) -> None:
        assert self.primary is not None
        self._req_id += 1
        rid = self._req_id
        try:
            self.primary.channel.send({"t": "req", "id": rid, "body": req})
        except ChannelClosed:
            if conn is not None:
                self._reply(conn, {"ok": False, "error": "the worker is gone: try again"})
            return
        if conn is not None:
            self._pending[rid] = (conn, req, time.monotonic() + 2.0)
        else:
            self._pending[rid] = (None, req, time.monotonic() + 2.0)        # type: ignore[assignment]

    def _answer(self, msg: dict[str, Any]) -> None:
        entry = self._pending.pop(msg.get("id"), None)     # type: ignore[arg-type]
        if entry is None:
            return
        conn, req, _dl = entry
        body = msg.get("body") if isinstance(msg.get("body"), dict) else {"ok": False, "error": "bad reply"}
        if req.get("cmd") == "status" and body.get("ok"):
            self._last_status = body["status"]
            body = {**body, "status": self._status(body["status"])}
        if conn is not None:
            self._reply(conn, body)

    def _expire_requests(self, now: float) -> None:
        for rid, (conn, req, deadline) in list(self._pending.items()):
            if now > deadline:
                del self._pending[rid]
                if conn is None:
                    continue
                if req.get("cmd") == "status":
                    self._reply(conn, {"ok": True, "status": self._status({}, note="the worker did not answer")})
                else:
                    self._reply(conn, {"ok": False, "error": "the worker did not answer in 2 s (a failover may "
                                                             "be under way): try again"})

    def _reply(self, conn: socket.socket, body: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(body).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def _status(self, worker: dict[str, Any], note: str = "") -> dict[str, Any]:
        st = dict(worker)
        for k, v in self._carried.items():
            if isinstance(st.get(k), int):
                st[k] += v
        st["ifname"], st["ifindex"] = self.tap.name, self.tap.ifindex
        if self.failures.gave_up:
            st["state"] = "failed"
            st["last_fault"] = self.failures.gave_up
        st.setdefault("state", "recovering")
        p, s = self.primary, self.spare
        st["worker"] = None if p is None else {"pid": p.pid, "implementation": p.implementation, "state": p.state,
                                               "up_s": round(time.monotonic() - p.up_at, 3) if p.up_at else 0.0}
        st["spare"] = None if s is None else {"pid": s.pid, "implementation": s.implementation, "state": s.state}
        st["supervisor"] = {"pid": os.getpid(), "failovers": self.failover_count,
                            "gave_up": self.failures.gave_up or None,
                            "implementation_next": self.failures.current, "note": note or None,
                            "device": (self.vfio.describe() if self.vfio is not None else
                                       self.node.describe() if self.node is not None else None),
                            "policy": {k: getattr(self.policy, k) for k in self.policy.__dataclass_fields__}}
        st["failovers"] = self.failover_count
        st["recent_failovers"] = [f.as_dict() for f in self.failovers[-10:]]
        st["last_failover"] = self.failovers[-1].as_dict() if self.failovers else None
        st["recent_recoveries"] = (self._carried_recoveries + list(st.get("recent_recoveries", [])))[-10:]
        return st

    def _inject_worker(self, kind: str) -> dict[str, Any]:
        c = self.primary
        if c is None or c.state != "running":
            return {"ok": False, "error": "no worker is running right now: try again in a moment"}
        if kind == "kill":
            os.kill(c.pid, signal.SIGKILL)
        elif kind == "stop":
            os.kill(c.pid, signal.SIGSTOP)
        elif kind == "segv-signal":
            os.kill(c.pid, signal.SIGSEGV)
        elif kind in ("segv", "spin", "hang", "exit"):
            c.channel.send({"t": "fault", "kind": kind})
        else:
            return {"ok": False, "error": f"unknown worker fault {kind!r}: use kill, stop, segv, spin, hang or exit"}
        return {"ok": True, "pid": c.pid}

    def _device_event(self, conn: socket.socket, action: str) -> None:
        if self.devhost is None:
            self._reply(conn, {"ok": False, "error": "device events exist only for the embedded model: unplug the "
                                                     "real device by hand"})
            return
        try:
            reply, _ = self.devhost.call({"t": "device", "action": action}, timeout=2.0)
            self._reply(conn, {"ok": bool(reply.get("ok")), "error": reply.get("error")})
        except (TimeoutError, ChannelClosed) as e:
            self._reply(conn, {"ok": False, "error": f"the device process did not answer: {e}"})

    def _serve_devhost(self) -> None:
        assert self.devhost is not None
        try:
            self.devhost.poll()
        except ChannelClosed:
            log.error("event=device-process-gone the embedded model's process died: the interface stays, "
                      "carrier off; restart udrv")
            self._set_carrier(False)
            self.devhost.close()
            self.devhost = None

    # --- stop ----------------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self.running = False
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for c in list(self.children):
            try:
                c.channel.send({"t": "stop"})
            except ChannelClosed:
                pass
        deadline = time.monotonic() + 5.0
        for c in list(self.children):
            try:
                c.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.popen.kill()
                c.popen.wait()
            self._forget(c)
        for c in list(self.dying):
            c.popen.wait()
            self.dying.remove(c)
            os.close(c.pidfd)
        if self.devhost is not None:
            try:
                self.devhost.send({"t": "stop"})
            except ChannelClosed:
                pass
        if self.devhost_proc is not None:
            try:
                self.devhost_proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.devhost_proc.kill()
                self.devhost_proc.wait()
        if self.node is not None:
            self.node.close()
        if self.vfio is not None:
            self.vfio.close()
        if self._ctrl is not None:
            unlisten(self.tap.name, self._ctrl)
        if self.journal is not None:
            self.journal.close()
        self.page.close()
        self.tap.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("event=stopped ifname=%s", self.tap.name)
