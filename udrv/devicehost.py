"""The device process of a supervised embedded model: the model outlives every worker.

Hardware does not die with the driver that drives it, so under the supervisor an embedded
model runs here, in a process of its own, with its wire (the peer namespace's TAP). Workers
reach it through connections the supervisor makes and hands over (one per worker, as each
worker gets its own open of a real device node), served by udrv/models/remote.py. The process
imports no driver.

    python -m udrv.devicehost --channel FD --model KIND --ifname IFNAME [--wire-mbit N]

Messages on the channel (udrv/channel.py): "connect" with a socket fd and its worker's pid;
"drop" (that worker is exiting: its connection goes at once); "device" (unplug, replug,
link-down, link-up, garbage:KIND); "stop".
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
from typing import Any

from .channel import Channel, ChannelClosed
from .models.catalog import device_event, make_model
from .models.remote import PciModelServer, UsbModelServer
from .peer import PeerConfig, PeerWire

log = logging.getLogger("udrv.device")


class DeviceHost:
    def __init__(self, channel: Channel, kind: str, ifname: str, wire_mbit: float | None, wire_delay_ms: float):
        self.channel = channel
        made = make_model(kind, wire_mbit, wire_delay_ms)
        self.model = made.model
        self.wire = made.device if made.device is not made.model else None
        self.server: Any = UsbModelServer(made.device) if made.bus == "usb" else PciModelServer(made.device)
        self.bus = made.bus
        self.peer = PeerWire(PeerConfig.for_interface(ifname))
        self.peer.connect(self.model)
        if self.wire is not None:
            self.wire.delay_transmit()
        self.running = True
        self.owners: dict[int, socket.socket] = {}      # worker pid -> its connection

    def run(self) -> None:
        cfg = self.peer.cfg
        self.channel.send({"t": "ready", "bus": self.bus, "model": type(self.model).__name__,
                           "peer": {"netns": cfg.netns, "host_ip": cfg.host_ip, "peer_ip": cfg.peer_ip}})
        p = select.poll()
        registered: set[int] = set()
        ch, peer = self.channel.fileno(), self.peer.fd
        p.register(ch, select.POLLIN)
        p.register(peer, select.POLLIN)
        while self.running:
            want = set(self.server.fds())
            for fd in registered - want:
                p.unregister(fd)
            for fd in want - registered:
                p.register(fd, select.POLLIN)
            registered = want
            readable = {fd for fd, _ev in p.poll(100)}
            if ch in readable:
                self._serve_channel()
            if peer in readable:
                self.peer.pump()
            self.server.serve(readable)

    def _serve_channel(self) -> None:
        try:
            messages = self.channel.poll()
        except ChannelClosed:
            self.running = False          # the supervisor is gone: so is the device
            return
        for msg, fds in messages:
            t = msg.get("t")
            if t == "connect" and len(fds) == 1:
                sock = socket.socket(fileno=fds[0])
                self.server.add(sock)
                self.owners[int(msg.get("owner", 0))] = sock
                continue
            for fd in fds:
                os.close(fd)
            if t == "device":
                error = device_event(self.model, str(msg.get("action", "")))
                self.channel.send({"t": "reply", "id": msg.get("id"), "ok": error is None, "error": error})
            elif t == "drop":
                # its worker is exiting: its transfers and claims go now, as a closed file's would
                sock = self.owners.pop(int(msg.get("owner", 0)), None)
                if sock is not None:
                    self.server.drop(sock)
            elif t == "stop":
                self.running = False

    def close(self) -> None:
        try:
            if self.wire is not None:
                self.wire.close()
            self.server.close()
        finally:
            self.peer.close()             # the namespace goes whatever else failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="udrv.devicehost")
    ap.add_argument("--channel", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ifname", required=True)
    ap.add_argument("--wire-mbit", type=float)
    ap.add_argument("--wire-delay-ms", type=float, default=0.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s udrv-device %(levelname)s %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the supervisor stops the device, not ^C
    channel = Channel(socket.socket(fileno=a.channel))
    host = DeviceHost(channel, a.model, a.ifname, a.wire_mbit, a.wire_delay_ms)
    try:
        host.run()
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
