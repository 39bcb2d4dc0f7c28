"""The wire side of an embedded device model: a TAP inside a peer network namespace.

The model's transmitted frames are written into the peer TAP; frames the peer's kernel sends
are read from it and delivered to the model's receive side. So the host talks through
`udrv0` -> driver -> model -> peer namespace, where ordinary tools (iperf3, a UDP echo) run.
"""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import zlib
from dataclasses import dataclass
from typing import Any

from .errors import PermissionDeniedError, UdrvError
from .tap import IFF_NO_PI, IFF_TAP, TUNSETIFF


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)
    except FileNotFoundError:
        raise UdrvError("the `ip` command is missing: install iproute2") from None
    except subprocess.CalledProcessError as e:
        raise UdrvError(f"`ip {' '.join(args)}` failed: {e.stderr.strip()}") from None


@dataclass
class PeerConfig:
    netns: str = "udrv-peer"
    ifname: str = "udrvpeer0"
    host_ip: str = "10.77.0.1/24"
    peer_ip: str = "10.77.0.2/24"

    @classmethod
    def for_interface(cls, ifname: str) -> "PeerConfig":
        """udrv0 gets the documented defaults; other interfaces their own namespace and subnet,
        so several daemons (or a test run beside a demo) never share a peer."""
        if ifname == "udrv0":
            return cls()
        n = 1 + zlib.crc32(ifname.encode()) % 250
        return cls(f"{ifname}-peer", f"{ifname[:11]}p", f"10.77.{n}.1/24", f"10.77.{n}.2/24")

    @property
    def peer_addr(self) -> str:
        return self.peer_ip.split("/")[0]

    @property
    def host_addr(self) -> str:
        return self.host_ip.split("/")[0]


class PeerNamespace:
    """The peer side as a scenario sees it (its addresses, commands inside its namespace), when
    the wire itself runs in another process (the supervised daemon's device process)."""

    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg

    def netns_exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.cfg.netns, *cmd]


class PeerWire:
    def __init__(self, cfg: PeerConfig | None = None):
        self.cfg = cfg or PeerConfig()
        if os.geteuid() != 0:
            raise PermissionDeniedError("the embedded device's peer namespace needs root: run with sudo")
        ip("netns", "del", self.cfg.netns, check=False)
        ip("netns", "add", self.cfg.netns)
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", self.cfg.ifname.encode(), IFF_TAP | IFF_NO_PI))
        # the fd stays attached to the interface after it moves to the namespace
        ip("link", "set", self.cfg.ifname, "netns", self.cfg.netns)
        ip("-n", self.cfg.netns, "link", "set", "lo", "up")
        ip("-n", self.cfg.netns, "addr", "add", self.cfg.peer_ip, "dev", self.cfg.ifname)
        ip("-n", self.cfg.netns, "link", "set", self.cfg.ifname, "up")
        self.model: Any = None
        self.to_model = 0
        self.read_errors = 0
        self.from_model = 0

    def connect(self, model: Any) -> None:
        self.model = model
        model.on_transmit = self._from_model

    def _from_model(self, frame: bytes) -> None:
        self.from_model += 1
        try:
            os.write(self.fd, frame)
        except OSError:
            pass          # the peer's queue is full: the wire drops, like a real one

    def pump(self, max_frames: int = 64) -> None:
        """Peer kernel -> model receive side."""
        for _ in range(max_frames):
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                # the peer namespace was removed under us: the wire is cut, the daemon lives on
                self.read_errors += 1
                return
            self.to_model += 1
            self.model.wire_receive(frame)

    def netns_exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.cfg.netns, *cmd]

    def close(self) -> None:
        os.close(self.fd)
        ip("netns", "del", self.cfg.netns, check=False)
