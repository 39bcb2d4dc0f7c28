"""A real TAP interface: the host's view of a udrv NIC.

The supervisor opens it once and keeps the fd for the life of the daemon, so the interface
(its name and ifindex) survives every recovery of the driver behind it. The fd can be passed
to a worker process. Host-side configuration (MAC, MTU, promiscuous/all-multicast flags,
multicast list) is read back from the kernel so the daemon can mirror it into the driver.

Offloads: when the driver declares some (`offloads`, see udrv.offload), the TAP is opened with
IFF_VNET_HDR, a 12-byte virtio-net header (TUNSETVNETHDRSZ) and TUNSETOFFLOAD for exactly
those: the kernel then hands us 64 KiB TCP frames and unfinished checksums, each behind a
header saying what is left to do, and every frame *written* to the TAP needs a header too
(`write()` puts a zeroed one in front: "nothing known about the checksum"). Without offloads
the TAP is opened exactly as before: no header anywhere.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, runtime_checkable

from .errors import PermissionDeniedError, UdrvError
from .offload import VNET_HDR_LEN, ZERO_HDR, tun_offload_flags

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETCARRIER = 0x400454E2
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
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


@runtime_checkable
class TapEnd(Protocol):
    """What a datapath that writes to the TAP itself needs of it (a Tap, or a test's stand-in)."""
    vnet_hdr_len: int

    def fileno(self) -> int: ...


def tap_behind(sink: Callable[[bytes], None]) -> TapEnd | None:
    """The TAP whose bound write() a sink is (what the daemon passes), or None."""
    owner = getattr(sink, "__self__", None)
    return owner if getattr(sink, "__name__", "") == "write" and isinstance(owner, TapEnd) else None


@dataclass(frozen=True)
class HostConfig:
    """What the host configured on the interface (what a recovery must preserve)."""
    mac: bytes
    mtu: int
    up: bool
    promisc: bool
    allmulti: bool
    multicast: tuple[bytes, ...]


def _open_tun(name: str, flags: int) -> tuple[int, str]:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise PermissionDeniedError("cannot open /dev/net/tun: run udrv as root or give it "
                                    "CAP_NET_ADMIN (setcap cap_net_admin+ep)") from None
    except FileNotFoundError:
        raise UdrvError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise PermissionDeniedError(f"creating TAP {name} needs CAP_NET_ADMIN: run udrv as root") from None
        if e.errno == errno.EBUSY:
            raise UdrvError(f"TAP {name} is already in use by another process: stop it or pick "
                            "another name with --ifname") from None
        raise UdrvError(f"cannot create TAP {name}: {e.strerror}") from None
    return fd, struct.unpack("16sH", res)[0].rstrip(b"\0").decode()


def _usable(offloads: Iterable[str]) -> frozenset[str]:
    """The offloads a TAP can give (TSO only with checksums); none at all when the kernel's
    tun driver has no virtio-net headers (TUNGETFEATURES; every kernel since 2.6.27 has)."""
    want = frozenset(offloads)
    if not tun_offload_flags(want):
        return frozenset()
    return want if _has_vnet_hdr() else frozenset()


def _has_vnet_hdr() -> bool:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return True                      # the TAP itself will say what is wrong
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
    except OSError:
        features = 0
    finally:
        os.close(fd)
    return bool(features & IFF_VNET_HDR)


class Tap:
    def __init__(self, name: str = "udrv0", offloads: Iterable[str] = ()):
        want = _usable(offloads)
        self.fd, self.name = _open_tun(name, IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if want else 0))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ifindex = self._ioctl_int(SIOCGIFINDEX)
        self.read_errors = 0
        self.write_errors = 0
        self.vnet_hdr_len = 0            # bytes of virtio-net header on every read and write
        self.offloads: frozenset[str] = frozenset()
        if want:
            self.vnet_hdr_len = VNET_HDR_LEN
            try:
                self._set_offloads(want)
            except BaseException:
                self.close()
                raise

    # --- offloads ---------------------------------------------------------------------------
    def set_offloads(self, offloads: Iterable[str], vnet_hdr: bool = False) -> None:
        """Ask the kernel for these offloads (udrv.offload names); none = no vnet header at all,
        unless `vnet_hdr` (a driver that writes GSO super-frames, RX coalescing, without TX
        offloads: the kernel then sends finished frames behind zeroed headers).
        IFF_VNET_HDR can only be chosen when a queue attaches, so switching it re-attaches:
        the interface is made persistent for the moment the fd is closed and opened again
        with the new flags (same name, same ifindex, same fd number), then not persistent."""
        want = _usable(offloads)
        on = bool(want) or (vnet_hdr and _has_vnet_hdr())
        if on != bool(self.vnet_hdr_len):
            self._reattach(IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if on else 0))
            self.vnet_hdr_len = VNET_HDR_LEN if on else 0
        if want or self.offloads:
            self._set_offloads(want)
        if on and not want:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))

    def _set_offloads(self, want: frozenset[str]) -> None:
        if want:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        # an int argument by value, not a pointer
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun_offload_flags(want))
        self.offloads = want

    def _reattach(self, flags: int) -> None:
        old_flags = self.tun_flags() & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(self.fd, TUNSETPERSIST, 1)     # an int by value: the interface outlives the fd
        number = self.fd
        os.close(number)
        error: UdrvError | None = None
        try:
            fd, _ = _open_tun(self.name, flags)
        except UdrvError as e:
            error = e
            fd, _ = _open_tun(self.name, old_flags)  # put the queue back as it was
        if fd != number:
            os.dup2(fd, number, inheritable=False)     # whoever holds the fd number keeps it
            os.close(fd)
        fcntl.ioctl(number, TUNSETPERSIST, 0)
        if error is not None:
            raise error
        if self._ioctl_int(SIOCGIFINDEX) != self.ifindex:
            raise UdrvError(f"TAP {self.name} changed its ifindex while switching the vnet header")

    def tun_flags(self) -> int:
        """IFF_* flags of the queue (TUNGETIFF): IFF_VNET_HDR shows whether headers are on."""
        res = fcntl.ioctl(self.fd, TUNGETIFF, bytes(40))
        return struct.unpack_from("16sH", res)[1]

    # --- frames ---------------------------------------------------------------------------
    def read_batch(self, max_frames: int, bufsize: int | None = None) -> list[bytes]:
        """Raw reads: with a vnet header on, each starts with it (Nic.enqueue strips it)."""
        if bufsize is None:
            # a GSO frame is up to 64 KiB of IP plus link headers, behind the vnet header
            bufsize = 65536 + 256 if self.vnet_hdr_len else 65536
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
            if self.vnet_hdr_len:
                # every write needs a header: zeroed = no offload, checksum not verified
                os.writev(self.fd, (ZERO_HDR, frame))
            else:
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
        """The link-layer multicast addresses the host stack wants (/proc/net/dev_mcast). Read
        4 times a second, so with os.read and no text layer: open() costs several more system
        calls, and in a TCG guest this was most of the daemon's housekeeping."""
        name = self.name.encode()
        out = []
        try:
            fd = os.open("/proc/net/dev_mcast", os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except OSError:
            return ()
        for line in b"".join(chunks).splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[1] == name:
                out.append(bytes.fromhex(parts[4].decode()))
        return tuple(sorted(out))

    def host_config(self) -> HostConfig:
        f = self.flags()
        return HostConfig(self.mac(), self.mtu(), bool(f & IFF_UP), bool(f & IFF_PROMISC),
                          bool(f & IFF_ALLMULTI), self.multicast())

    def close(self) -> None:
        self._sock.close()
        os.close(self.fd)
