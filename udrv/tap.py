"""A real TAP interface: the host's view of a udrv NIC.

The supervisor opens it once and keeps the fd for the life of the daemon, so the interface
(its name and ifindex) survives every recovery of the driver behind it. The fd can be passed
to a worker process. Host-side configuration (MAC, MTU, promiscuous/all-multicast flags,
multicast list) is read back from the kernel so the daemon can mirror it into the driver.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from .errors import PermissionDeniedError, UdrvError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCGIFHWADDR = 0x8927
SIOCSIFHWADDR = 0x8924
SIOCGIFINDEX = 0x8933
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
ARPHRD_ETHER = 1


@dataclass(frozen=True)
class HostConfig:
    """What the host configured on the interface (what a recovery must preserve)."""
    mac: bytes
    mtu: int
    up: bool
    promisc: bool
    allmulti: bool
    multicast: tuple[bytes, ...]


class Tap:
    def __init__(self, name: str = "udrv0"):
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            raise PermissionDeniedError("cannot open /dev/net/tun: run udrv as root or give it "
                                        "CAP_NET_ADMIN (setcap cap_net_admin+ep)") from None
        except FileNotFoundError:
            raise UdrvError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
            res = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EPERM:
                raise PermissionDeniedError(f"creating TAP {name} needs CAP_NET_ADMIN: run udrv as root") from None
            if e.errno == errno.EBUSY:
                raise UdrvError(f"TAP {name} is already in use by another process: stop it or pick "
                                "another name with --ifname") from None
            raise UdrvError(f"cannot create TAP {name}: {e.strerror}") from None
        self.name = struct.unpack("16sH", res)[0].rstrip(b"\0").decode()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ifindex = self._ioctl_int(SIOCGIFINDEX)
        self.read_errors = 0
        self.write_errors = 0

    # --- frames ---------------------------------------------------------------------------
    def read_batch(self, max_frames: int, bufsize: int = 65536) -> list[bytes]:
        frames: list[bytes] = []
        read = os.read
        for _ in range(max_frames):
            try:
                frames.append(read(self.fd, bufsize))
            except BlockingIOError:
                break
            except OSError:
                self.read_errors += 1
                break
        return frames

    def write(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:
            # interface down or queue full: the kernel drops, we count; never fatal
            self.write_errors += 1

    def fileno(self) -> int:
        return self.fd

    # --- interface configuration ------------------------------------------------------------
    def _ifreq(self, payload: bytes = b"") -> bytes:
        return struct.pack("16s", self.name.encode()) + payload.ljust(24, b"\0")

    def _ioctl_int(self, req: int) -> int:
        res = fcntl.ioctl(self._sock, req, self._ifreq())
        return struct.unpack_from("i", res, 16)[0]

    def flags(self) -> int:
        res = fcntl.ioctl(self._sock, SIOCGIFFLAGS, self._ifreq())
        return struct.unpack_from("H", res, 16)[0]

    def set_up(self, up: bool = True) -> None:
        f = self.flags()
        f = (f | IFF_UP) if up else (f & ~IFF_UP)
        fcntl.ioctl(self._sock, SIOCSIFFLAGS, self._ifreq(struct.pack("H", f)))

    def mac(self) -> bytes:
        res = fcntl.ioctl(self._sock, SIOCGIFHWADDR, self._ifreq())
        return res[18:24]

    def set_mac(self, mac: bytes) -> None:
        fcntl.ioctl(self._sock, SIOCSIFHWADDR, self._ifreq(struct.pack("H6s", ARPHRD_ETHER, mac)))

    def mtu(self) -> int:
        return self._ioctl_int(SIOCGIFMTU)

    def set_mtu(self, mtu: int) -> None:
        fcntl.ioctl(self._sock, SIOCSIFMTU, self._ifreq(struct.pack("i", mtu)))

    def set_carrier(self, on: bool) -> None:
        """Tell the host whether the link is up (the interface itself stays)."""
        try:
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(on)))
        except OSError:
            pass   # kernels before 4.19 lack it: the interface simply stays "up"

    def multicast(self) -> tuple[bytes, ...]:
        out = []
        try:
            with open("/proc/net/dev_mcast") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 5 and parts[1] == self.name:
                        out.append(bytes.fromhex(parts[4]))
        except OSError:
            pass
        return tuple(sorted(out))

    def host_config(self) -> HostConfig:
        f = self.flags()
        return HostConfig(self.mac(), self.mtu(), bool(f & IFF_UP), bool(f & IFF_PROMISC),
                          bool(f & IFF_ALLMULTI), self.multicast())

    def close(self) -> None:
        self._sock.close()
        os.close(self.fd)
