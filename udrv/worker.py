"""A driver worker: the driver, its guards and its datapath, in a process the supervisor can lose.

    python -m udrv.worker --channel FD

Started by the supervisor (udrv/supervisor.py) as the primary or as a warm spare. A spare
imports everything, loads the C fast path and the driver class, maps the heartbeat page and
waits; at promotion it takes the device over from the last checkpoint (Nic.adopt) and runs the
same daemon loop as `udrv run --in-process`, with three differences:
  * the TAP is the supervisor's (the fd arrives over SCM_RIGHTS; what needs privilege — its
    MAC, MTU, flags and carrier — is asked of the supervisor, `SupervisedTap`);
  * the TX journal is the supervisor's memfd, so what this worker leaves unconfirmed is there
    for the next one;
  * the loop beats the heartbeat at least every BEAT_PERIOD, and publishes the deadline of each
    configuration call it runs.
Messages (udrv/channel.py): from the supervisor "init", "arm" (a spare: build everything that
touches no device), "state" (each checkpoint, passed on to a spare as it is taken and decoded
while it waits), "start", "req" (a control request), "fault", "stop"; to it "hello", "state" (the checkpoint, opaque to it), "up", "tap", "journal",
"reply".
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any

from .channel import Channel, ChannelClosed
from .heartbeat import BEAT_PERIOD, Heartbeat, HeartbeatPage
from .tap import Tap

log = logging.getLogger("udrv.worker")

PR_SET_PDEATHSIG = 1
DATAPATH = ("xmit", "poll")


def die_with_parent() -> None:
    """The kernel kills this process when the supervisor dies (no orphaned driver)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class SupervisedTap(Tap):
    """The supervisor's TAP as a worker holds it: frames through the fd it was given, reads of
    the configuration through ioctls anyone may make, changes through the supervisor."""

    def __init__(self, channel: Channel, name: str, ifindex: int):
        self.channel = channel
        self.name, self.ifindex = name, ifindex
        self.fd = -1
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.read_errors = 0
        self.write_errors = 0
        self.vnet_hdr_len = 0
        self.offloads: frozenset[str] = frozenset()

    def _ask(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        reply, fds = self.channel.call({"t": "tap", "op": op, **args}, timeout=5.0)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            from .errors import UdrvError
            raise UdrvError(f"the supervisor refused to {op} the TAP: {reply.get('error')}")
        return reply, fds

    def attach(self, offloads: frozenset[str] = frozenset(), vnet_hdr: bool = False) -> None:
        """Get the TAP's fd, with the offloads the supervisor set up for these (the first worker's
        request decides; the TAP cannot change them while a worker holds it)."""
        reply, fds = self._ask("attach", offloads=sorted(offloads), vnet_hdr=vnet_hdr)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fds[0]
        os.set_blocking(self.fd, False)
        self.vnet_hdr_len = int(reply["vnet_hdr_len"])
        self.offloads = frozenset(reply["offloads"])

    def set_offloads(self, offloads: Any, vnet_hdr: bool = False) -> None:
        self.attach(frozenset(offloads), vnet_hdr)

    def set_up(self, up: bool = True) -> None:
        self._ask("up", up=up)

    def set_mac(self, mac: bytes) -> None:
        self._ask("mac", mac=mac.hex())

    def set_mtu(self, mtu: int) -> None:
        self._ask("mtu", mtu=mtu)

    def set_carrier(self, on: bool) -> None:
        self.channel.send({"t": "tap", "op": "carrier", "on": on})    # no answer needed

    def close(self) -> None:
        self._sock.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def beating_watchdog(hb: Heartbeat) -> Any:
    """The guard's watchdog, publishing each configuration call's deadline in the heartbeat
    slot (datapath calls are short; a long one is a hang the heartbeat shows)."""
    from .guard import Watchdog

    class BeatingWatchdog(Watchdog):
        _published = False

        @property                                   # type: ignore[override]
        def current(self) -> tuple[str, float] | None:
            return self._current

        @current.setter
        def current(self, cur: tuple[str, float] | None) -> None:
            Watchdog.current.fset(self, cur)        # type: ignore[attr-defined]
            if cur is not None and cur[0] not in DATAPATH:
                hb.busy_until(cur[1])
                self._published = True
            elif self._published:
                hb.busy_until(None)
                self._published = False

    return BeatingWatchdog()


def encode_state(state: Any) -> str:
    return base64.b64encode(pickle.dumps(state)).decode()


def decode_state(blob: str) -> Any:
    return pickle.loads(base64.b64decode(blob))


class SupervisorDma:
    """DMA memory of a VFIO device, allocated and mapped into the IOMMU by the supervisor
    (udrv.vfio.DmaBroker)."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def _ask(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        from .errors import DmaError
        try:
            reply, fds = self.channel.call({"t": "dma", "op": op, **args}, timeout=5.0)
        except (TimeoutError, ChannelClosed) as e:
            raise DmaError(f"the supervisor did not answer a DMA request ({op}): {e}") from None
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise DmaError(f"the supervisor refused DMA memory ({op}): {reply.get('error')}")
        return reply, fds

    def alloc(self, size: int, align: int) -> tuple[int, int, int, bool]:
        reply, fds = self._ask("alloc", size=size, align=align)
        if len(fds) != 1:
            from .errors import DmaError
            for fd in fds:
                os.close(fd)
            raise DmaError("the supervisor sent no memory for a DMA buffer")
        return int(reply["iova"]), fds[0], int(reply["mapped"]), bool(reply["huge"])

    def free(self, iova: int) -> None:
        self._ask("free", iova=iova)

    def release_orphans(self) -> int:
        return int(self._ask("orphans")[0]["released"])


class Worker:
    def __init__(self, channel: Channel):
        self.channel = channel
        self.hb: Heartbeat | None = None
        self.daemon: Any = None
        self.transport: Any = None
        self.tap: SupervisedTap | None = None
        self._last_state = ""
        self._given: Any = None                  # the latest checkpoint the supervisor passed on

    def run(self) -> int:
        init, fds = self.channel.recv()
        if init.get("t") != "init" or not fds:
            raise SystemExit("udrv worker: expected an init message with the heartbeat page")
        self.hb = HeartbeatPage(fds[0]).slot(int(init["slot"]))
        self.hb.claim(os.getpid())
        # warm: everything a takeover needs is loaded before anyone waits for it
        from . import fastpath
        from .daemon import Daemon, DaemonTimers         # noqa: F401
        from .nic import Nic, NicOptions                 # noqa: F401
        fastpath.available()
        impls = self._implementations(init, fds[1:])
        self._preload()
        if os.environ.get("UDRV_WORKER_PRIVILEGES") != "keep":
            from .sandbox import drop_privileges
            log.debug("event=privileges-dropped %s", drop_privileges())
        die_with_parent()                    # after the drop: a change of credentials clears it
        self.channel.send({"t": "hello", "pid": os.getpid(), "implementations": [c.__name__ for c in impls]})
        while True:
            msg, fds = self.channel.recv()
            t = msg.get("t")
            if t == "stop":
                if self.transport is not None:
                    self.transport.close()
                return 0
            if t == "state":
                self._given = decode_state(msg["blob"])      # decoded now, not at promotion
                continue
            if t == "arm" or (t == "start" and self.daemon is None):
                self._arm(init, msg, fds, impls)
                self.channel.send({"t": "armed"})
            if t == "start":
                if self.daemon is None:
                    raise SystemExit("udrv worker: started before it was given a device")
                return self._go(msg)

    @staticmethod
    def _preload() -> None:
        """What this worker may import later, imported while it can still read every file (the
        interpreter's own library may not be readable by the user it becomes)."""
        import importlib
        for name in ("udrv.models.remote", "udrv.models.catalog", "udrv.usbnet", "udrv.usbring", "udrv.usbsimple",
                     "udrv.pcinet", "udrv.pciengine", "udrv.pciring", "udrv.journal", "udrv.guard", "udrv.hostwatch",
                     "udrv.placement", "udrv.offload", "traceback", "linecache", "tokenize", "unicodedata"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        # every codec: a driver decodes a string descriptor (UTF-16LE) long after start-up
        import encodings
        import pkgutil
        for m in pkgutil.iter_modules(encodings.__path__):
            try:
                importlib.import_module(f"encodings.{m.name}")
            except Exception:          # platform codecs (mbcs, oem) do not import here
                pass

    def _implementations(self, init: dict[str, Any], fds: list[int]) -> tuple[Any, ...]:
        from .models.catalog import BUS
        from .registry import embedded_driver, implementations, usb_driver_for, usb_model_implementations
        dev = init["device"]
        if dev["kind"] == "usb":
            # this worker's own open of the device: the driver follows from its descriptors
            from .errors import UdrvError
            from .libusb import LibusbTransport, UsbSelector
            self.transport = LibusbTransport.wrap(fds[0], UsbSelector.parse(dev["spec"]))
            cls = usb_driver_for(self.transport.info)
            if cls is None:
                raise UdrvError(f"no udrv driver knows USB device {self.transport.info.ident}: `udrv list` "
                                "shows supported ones")
            return implementations(cls, init.get("impl"))
        if dev["kind"] == "pci":
            from .errors import UdrvError
            from .registry import pci_driver_for
            from .vfio import BrokeredVfioTransport
            self.transport = BrokeredVfioTransport.for_worker(fds[0], dev["bdf"], SupervisorDma(self.channel))
            info = self.transport.info
            cls = pci_driver_for(info.vendor, info.device)
            if cls is None:
                raise UdrvError(f"no udrv driver knows PCI device {info.ident} at {info.bdf}")
            return implementations(cls, init.get("impl"))
        if dev["kind"] != "model":
            raise SystemExit(f"udrv worker: devices of kind {dev['kind']!r} are not served by workers")
        cls = embedded_driver(dev["model"])
        if BUS[dev["model"]] == "usb":
            return usb_model_implementations(cls, init.get("impl"))
        return implementations(cls, init.get("impl"))

    def _transport(self, init: dict[str, Any], fds: list[int]) -> Any:
        if init["device"]["kind"] in ("usb", "pci"):
            return self.transport                 # opened with init
        from .models.remote import RemotePciTransport, RemoteUsbTransport
        hb = self.hb
        assert hb is not None
        sock = socket.socket(fileno=fds[0])
        cls = RemoteUsbTransport if init["device"]["bus"] == "usb" else RemotePciTransport
        return cls(sock, waiting=lambda deadline: hb.busy_until(deadline, "device"))

    def _arm(self, init: dict[str, Any], arm: dict[str, Any], fds: list[int], impls: tuple[Any, ...]) -> None:
        """Everything a takeover needs that touches no device: the device's connection, the TAP,
        the journal, the driver instance and its datapath, the daemon around them."""
        from .daemon import Daemon, DaemonTimers
        from .journal import TxJournal
        from .nic import Nic, NicOptions
        hb = self.hb
        assert hb is not None
        self.transport = transport = self._transport(init, fds)
        self.tap = tap = SupervisedTap(self.channel, arm["tap"]["name"], int(arm["tap"]["ifindex"]))
        names = [c.__name__ for c in impls]
        first = names.index(arm["implementation"]) if arm.get("implementation") in names else 0
        ordered = impls[first:] + impls[:first]

        def journal(nslots: int, slot_size: int) -> TxJournal:
            reply, jfds = self.channel.call({"t": "journal", "nslots": nslots, "slot_size": slot_size}, timeout=5.0)
            if not reply.get("ok"):
                raise SystemExit(f"udrv worker: no journal: {reply.get('error')}")
            return TxJournal.attach(jfds[0], nslots, slot_size)

        o = init["options"]
        nic = Nic(ordered, transport, tap.write,
                  NicOptions(guards=o["guards"], recovery=o["recovery"], config_deadline=o["config_deadline"],
                             datapath_deadline=o["datapath_deadline"], swap_after=o["swap_after"],
                             aqm_target=o["aqm_target"], aqm_interval=o["aqm_interval"], aqm_ecn=o["aqm_ecn"]),
                  watchdog=beating_watchdog(hb), tap=tap, journal=journal, on_state=self._send_state,
                  on_progress=hb.progress, on_busy=lambda deadline: hb.busy_until(deadline, "restart"),
                  on_recovery=self._report_recovery,
                  reopen=self._reopen if init["device"]["kind"] == "usb" else None)
        self.daemon = Daemon(nic, tap, timers=DaemonTimers(beat=BEAT_PERIOD),
                             extra_fds={self.channel.fileno(): self._serve_channel}, on_tick=self._tick,
                             serve_control=False)
        self.daemon.start_housekeeping(paused=True)
        signal.signal(signal.SIGTERM, self.daemon.stop)

    def _reopen(self) -> Any:
        """After an unplug: a new open of the device, from the supervisor (DeviceNotFound while
        it is still away; Nic tries again)."""
        from .errors import DeviceNotFound
        from .libusb import LibusbTransport
        old = self.transport
        reply, fds = self.channel.call({"t": "device"}, timeout=5.0)
        if not reply.get("ok") or not fds:
            raise DeviceNotFound(str(reply.get("error") or "the supervisor has no new open of the device"))
        self.transport = LibusbTransport.wrap(fds[0], old.selector, context=old.ctx)
        return self.transport

    def _state_of(self, start: dict[str, Any]) -> Any:
        if start.get("state") is not None:
            return decode_state(start["state"])
        if self._given is None:
            raise SystemExit("udrv worker: told to take over without a checkpoint")
        return self._given

    def _go(self, start: dict[str, Any]) -> int:
        d, hb = self.daemon, self.hb
        assert hb is not None
        nic = d.nic
        try:
            t0 = time.monotonic()
            if start["mode"] == "adopt":
                took = d.take_over(self._state_of(start))
                up = {"how": took.how, "reissued": took.reissued, "restore_ms": round(took.restore_ms, 3)}
            else:
                d.start()
                up = {"how": "probed", "reissued": 0, "restore_ms": 0.0}
            hb.beat()
            self.channel.send({"t": "up", "pid": os.getpid(), "implementation": nic.driver_cls.__name__,
                               "mac": nic.mac.hex(), "link": nic.link.up,
                               "takeover_ms": round((time.monotonic() - t0) * 1000, 3), **up})
            d.run()
        finally:
            d.close()
            self.transport.close()
            self.tap.close()
        return 0

    # --- the loop's hooks ---------------------------------------------------------------------
    def _tick(self) -> None:
        assert self.hb is not None
        self.hb.beat()
        if self.channel.has_pending():        # arrived while this worker waited for an answer
            self._serve_channel()

    def _report_recovery(self, rec: Any) -> None:
        """Each in-process recovery, as it happens: the supervisor keeps it past this worker."""
        try:
            self.channel.send({"t": "recovery", "rec": rec.as_dict()})
        except ChannelClosed:
            pass

    def _send_state(self) -> None:
        if self.daemon is None:
            return
        blob = encode_state(self.daemon.nic.state_for_successor())
        if blob != self._last_state:
            self._last_state = blob
            self.channel.send({"t": "state", "blob": blob})

    def _serve_channel(self) -> None:
        d = self.daemon
        try:
            messages = self.channel.poll()
        except ChannelClosed:
            d.stop()                          # the supervisor is gone (the kernel kills us anyway)
            return
        for msg, fds in messages:
            for fd in fds:
                os.close(fd)
            t = msg.get("t")
            if t == "req":
                body = msg.get("body") if isinstance(msg.get("body"), dict) else {}
                self.channel.send({"t": "reply", "id": msg.get("id"), "body": d.handle_request(body)})
            elif t == "fault":
                native_fault(str(msg.get("kind")))
            elif t == "stop":
                d.stop()


def native_fault(kind: str) -> None:
    """A fault of the class only a process boundary survives, in this process, now."""
    if kind in ("segv", "spin", "hang"):
        from . import fastpath
        fastpath.require()
        lib = fastpath.lib
        if kind == "segv":
            lib.udrv_fault_segv()             # a store through NULL in C, as a bug in native/ makes
        elif kind == "spin":
            lib.udrv_fault_spin()             # a C busy loop, the interpreter lock released
        else:
            r, _w = os.pipe()
            lib.udrv_fault_block(r)           # a blocking call that never returns
    elif kind == "exit":
        os._exit(70)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="udrv.worker")
    ap.add_argument("--channel", type=int, required=True)
    a = ap.parse_args(argv)
    die_with_parent()                         # again after the privilege drop (udrv/sandbox.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # ^C reaches the supervisor, which stops us
    logging.basicConfig(level=logging.DEBUG if os.environ.get("UDRV_VERBOSE") else logging.INFO,
                        format=f"%(asctime)s udrv-worker[{os.getpid()}] %(levelname)s %(message)s", stream=sys.stderr)
    channel = Channel(socket.socket(fileno=a.channel))
    try:
        return Worker(channel).run()
    except ChannelClosed:
        return 0


if __name__ == "__main__":
    sys.exit(main())
