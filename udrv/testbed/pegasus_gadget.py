"""Serve the pegasus register model as a real USB device (kernel tier, run as root in the guest).

The model (udrv.models.pegasus) becomes a FunctionFS gadget on dummy_udc.0, so the same
kernel's USB host side enumerates an ADMtek 07a6:8515; its wire side is a TAP inside network
namespace `pegpeer` (address 10.88.0.2/24), so whatever drives the "dongle" — the kernel's
pegasus.ko or `udrv run usb:07a6:8515` — reaches a real peer network stack.

    python3 -m udrv.testbed.pegasus_gadget serve [--duration S] [--kernel-driver]
    (python3 tools/pegasus_gadget.py serve ... is the same)
        --kernel-driver: modprobe pegasus, give its netdev 10.88.0.1/24 and bring it up

Library (used by tests/kernel/test_pegasus_gadget.py and udrv.bench.pegasus):
    PegasusRig      gadget + wire, counters(), model_counters(). The bulk endpoints and the wire TAP
                    are served by the C pump (udrv.testbed.pegasus_pump) when udrv._rigs is built
                    (RigConfig.pump=False or UDRV_GADGET_PUMP=0: the pure-Python path, where the
                    gadget's own loop pumps the wire)
    in_netns(name)  context manager: sockets created inside belong to that namespace
    udp_ping()      UDP round trips counted at both ends, payloads cycling through EDGE_SIZES
                    (frames whose USB transfers hit the ZLP and pad rules), replies compared
    UdpEcho, Pinger, BackgroundPing (busybox ping: traffic that costs no Python per packet)
    dmesg_tail(), wait_netdev(), kernel_netdev(), wait_carrier(), netdev_stats()
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from . import pegasus_pump
from .configfs import GadgetError, interface_driver, interface_netdevs, modprobe, wait_for
from .ffs import GadgetConfig, ModelGadget
from ..models.pegasus import PegasusModel
from ..peer import PeerConfig, PeerWire, ip

NETNS = "pegpeer"
WIRE_IFNAME = "pegwire0"
HOST_IP = "10.88.0.1/24"
PEER_IP = "10.88.0.2/24"
ECHO_PORT = 7007

NETDEV_TIMEOUT = 10.0        # pegasus.ko probe (~31 control requests) + register_netdev
CARRIER_TIMEOUT = 8.0        # pegasus.ko polls the PHY every 2 s
PING_TIMEOUT = 1.0


# --- network namespaces ----------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace `name` (this thread only); None = stay where we are.

    Sockets keep the namespace they were created in, so one process can talk on both sides.
    """
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    except FileNotFoundError:
        os.close(own)
        raise GadgetError(f"no network namespace {name!r}: create it with `ip netns add {name}`") from None
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed (run as root)")
        try:
            yield
        finally:
            _libc.setns(own, _CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(own)


def _addr(cidr: str) -> str:
    return cidr.split("/")[0]


# --- UDP round trips ------------------------------------------------------------------------

class UdpEcho:
    """Echo every datagram back; counts what it received (the far end of a ping)."""

    def __init__(self, netns: str | None, ip_cidr: str, port: int = ECHO_PORT):
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((_addr(ip_cidr), port))
        self.sock.settimeout(0.2)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="udp-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except (socket.timeout, OSError):
                continue
            self.received += 1
            try:
                self.sock.sendto(data, peer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


@dataclass
class PingStats:
    sent: int = 0
    replies: int = 0
    corrupt: int = 0                 # a reply with our sequence number but other bytes
    rtts_ms: list[float] = field(default_factory=list)
    reply_times: list[float] = field(default_factory=list)     # monotonic time of each reply

    @property
    def median_rtt_ms(self) -> float:
        r = sorted(self.rtts_ms)
        return r[len(r) // 2] if r else float("nan")

    def summary(self) -> dict:
        return {"sent": self.sent, "replies": self.replies, "corrupt": self.corrupt,
                "median_rtt_ms": round(self.median_rtt_ms, 2)}


# UDP payload sizes whose frames hit the USB edge cases (Ethernet + IP + UDP headers = 42 bytes):
# RX transfer = frame + 4-byte trailer = 512 / 1024 bytes (needs a ZLP after it), TX transfer =
# 2-byte length + frame = 512 / 1024 bytes (needs the pad byte), and a full 1514-byte frame.
EDGE_SIZES = (466, 978, 468, 980, 1472, 64)


class Pinger:
    """Sequence-numbered UDP request/reply from `netns` (None = this namespace) to dst; the
    payload size cycles through `sizes`."""

    def __init__(self, netns: str | None, src_cidr: str, dst_cidr: str, port: int = ECHO_PORT,
                 sizes: Sequence[int] = (64,)):
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((_addr(src_cidr), 0))
        self.dst = (_addr(dst_cidr), port)
        self.sizes = [max(n, 12) for n in sizes]
        self.seq = 0
        self.stats = PingStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        self.seq += 1
        seq = self.seq
        size = self.sizes[(seq - 1) % len(self.sizes)]
        payload = struct.pack("!Id", seq, time.monotonic()).ljust(size, bytes([seq & 0xFF]))
        self.stats.sent += 1
        t0 = time.monotonic()
        try:
            self.sock.sendto(payload, self.dst)
        except OSError:
            return False
        end = t0 + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, OSError):
                return False
            if len(data) >= 4 and struct.unpack("!I", data[:4])[0] == seq:
                if data != payload:
                    self.stats.corrupt += 1
                    return False
                now = time.monotonic()
                self.stats.replies += 1
                self.stats.rtts_ms.append((now - t0) * 1000)
                self.stats.reply_times.append(now)
                return True

    def run(self, count: int, timeout: float = PING_TIMEOUT) -> PingStats:
        for _ in range(count):
            self.ping(timeout)
        return self.stats

    def wait_first_reply(self, timeout: float) -> bool:
        """Ping until one comes back (ARP, carrier and the first transfers settle)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ping(min(PING_TIMEOUT, max(0.05, end - time.monotonic()))):
                return True
        return False

    def start_background(self, gap: float = 0.02) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.ping(PING_TIMEOUT)
                self._stop.wait(gap)
        self._thread = threading.Thread(target=loop, name="pinger", daemon=True)
        self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PING_TIMEOUT + 1)

    def replies_after(self, t: float) -> int:
        return sum(1 for x in self.stats.reply_times if x > t)

    def close(self) -> None:
        self.stop_background()
        self.sock.close()


class BackgroundPing:
    """`busybox ping -i GAP dst` from a namespace: steady background traffic that costs no Python
    per packet (under TCG the gadget and udrv need the CPU); reply times are kept."""

    def __init__(self, netns: str | None, dst_cidr: str, gap: float = 0.1, size: int = 56):
        cmd = ["busybox", "ping", "-i", str(gap), "-s", str(size), _addr(dst_cidr)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reply_times: list[float] = []
        self.transmitted = self.received = 0
        self._thread = threading.Thread(target=self._read, name="bgping", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if " seq=" in line and "bytes from" in line:
                self.reply_times.append(time.monotonic())
            elif "packets transmitted" in line:
                nums = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
                if len(nums) >= 2:
                    self.transmitted, self.received = nums[0], nums[1]

    def replies_after(self, t: float) -> int:
        return sum(1 for x in self.reply_times if x > t)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)          # ping prints its summary on SIGINT
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(2)
        return {"transmitted": self.transmitted, "received": self.received, "replies_seen": len(self.reply_times)}


def udp_ping(src_ns: str | None, src_cidr: str, dst_ns: str | None, dst_cidr: str, count: int,
             settle: float = 5.0, port: int = ECHO_PORT, sizes: Sequence[int] = EDGE_SIZES) -> dict:
    """`count` round trips src -> dst -> src after a settle phase; counted at both ends, every
    reply compared byte for byte with its request."""
    echo = UdpEcho(dst_ns, dst_cidr, port)
    pinger = Pinger(src_ns, src_cidr, dst_cidr, port, sizes)
    try:
        if not pinger.wait_first_reply(settle):
            return {"settled": False, "sent": pinger.stats.sent, "replies": 0, "echoed": echo.received}
        base_sent, base_replies, base_echo = pinger.stats.sent, pinger.stats.replies, echo.received
        pinger.stats.rtts_ms.clear()
        pinger.run(count)
        return {"settled": True, "sent": pinger.stats.sent - base_sent,
                "echoed": echo.received - base_echo, "replies": pinger.stats.replies - base_replies,
                "corrupt": pinger.stats.corrupt, "sizes": list(sizes),
                "median_rtt_ms": round(pinger.stats.median_rtt_ms, 2)}
    finally:
        pinger.close()
        echo.close()


# --- the kernel's side ------------------------------------------------------------------------

def dmesg_tail(pattern: str | None = None, lines: int = 40) -> list[str]:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = out.splitlines()
    if pattern:
        rows = [r for r in rows if pattern.lower() in r.lower()]
    return rows[-lines:]


def kernel_netdev(dev: Path) -> str | None:
    names = interface_netdevs(dev)
    return names[0] if names else None


def wait_netdev(dev: Path, driver: str, timeout: float = NETDEV_TIMEOUT) -> str:
    """Wait until `driver` is bound to interface 0 of dev and has registered a netdev."""
    found: list[str] = []

    def ready() -> bool:
        if interface_driver(dev) != driver:
            return False
        name = kernel_netdev(dev)
        if name:
            found.append(name)
        return bool(name)
    try:
        wait_for(ready, timeout, f"{driver} binding to {dev.name} and registering a netdev")
    except GadgetError as e:
        why = "\n  ".join(dmesg_tail(driver, 8) + dmesg_tail("usb", 6)) or "(nothing in dmesg)"
        raise GadgetError(f"{e}; bound driver: {interface_driver(dev)}; dmesg:\n  {why}") from None
    return found[0]


def wait_carrier(ifname: str, timeout: float = CARRIER_TIMEOUT) -> bool:
    path = Path(f"/sys/class/net/{ifname}/carrier")

    def up() -> bool:
        try:
            return path.read_text().strip() == "1"
        except OSError:
            return False
    try:
        wait_for(up, timeout, f"carrier on {ifname}")
        return True
    except GadgetError:
        return False


def netdev_stats(ifname: str) -> dict[str, int]:
    base = Path(f"/sys/class/net/{ifname}/statistics")
    keys = ("rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_dropped", "rx_missed_errors")
    out = {}
    for k in keys:
        try:
            out[k] = int((base / k).read_text())
        except OSError:
            pass
    return out


def configure_host_side(ifname: str, cidr: str = HOST_IP) -> None:
    ip("addr", "flush", "dev", ifname, check=False)
    ip("addr", "add", cidr, "dev", ifname)
    ip("link", "set", ifname, "up")


def quiet_ipv6() -> None:
    """No router solicitations / MLD reports on new interfaces: fewer stray frames to count."""
    for key in ("default", "all"):
        try:
            Path(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6").write_text("1\n")
        except OSError:
            pass


# --- the rig -----------------------------------------------------------------------------------

@dataclass
class RigConfig:
    gadget_name: str = "pegasus"
    netns: str = NETNS
    wire_ifname: str = WIRE_IFNAME
    peer_ip: str = PEER_IP
    host_ip: str = HOST_IP
    pump: bool | None = None     # C data path: None = when built (and UDRV_GADGET_PUMP is not 0)


def _want_pump(cfg: RigConfig) -> bool:
    if cfg.pump is not None:
        return cfg.pump
    return os.environ.get("UDRV_GADGET_PUMP", "1") != "0" and pegasus_pump.available()


class PegasusRig:
    """Pegasus model served over FunctionFS, its wire in a namespace with the peer address."""

    def __init__(self, cfg: RigConfig | None = None, **model_args):
        self.cfg = cfg or RigConfig()
        self.model = PegasusModel(**model_args)
        self.wire: PeerWire | None = None
        self.gadget: ModelGadget | None = None
        self.pump: pegasus_pump.PegasusPump | None = None

    def start(self) -> "PegasusRig":
        c = self.cfg
        # the ep0 thread must get the GIL quickly when a SETUP arrives (default switch: 5 ms)
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        if not Path("/dev/net/tun").exists():
            modprobe("tun")              # no udev in the guest to load it on first use
        try:
            self.wire = PeerWire(PeerConfig(netns=c.netns, ifname=c.wire_ifname, host_ip=c.host_ip,
                                            peer_ip=c.peer_ip))
            self.wire.connect(self.model)
            if _want_pump(c):
                # C owns the bulk endpoints and the wire; the model keeps ep0 and its registers
                self.pump = pegasus_pump.PegasusPump(self.model, self.wire.fd, self.wire)
            self.gadget = ModelGadget(self.model, GadgetConfig(name=c.gadget_name), offload=self.pump).start()
            if self.pump is None:
                # the wire is pumped by the gadget's own loop: no frame crosses between threads
                assert self.gadget.server is not None
                self.gadget.server.add_reader(self.wire.fd, self.wire.pump)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def host_device(self) -> Path:
        assert self.gadget is not None and self.gadget.host_device is not None
        return self.gadget.host_device

    def model_counters(self):
        """The model's counters, with what the C pump moved folded in."""
        if self.pump is not None:
            self.pump.fold()
        return self.model.counters

    def counters(self) -> dict:
        m = dataclasses.asdict(self.model_counters())
        c = self.gadget.counters if self.gadget else None
        f = {**dataclasses.asdict(c), "setup_ms_mean": round(c.setup_ms_mean, 2)} if c else {}
        w = {"to_model": self.wire.to_model, "from_model": self.wire.from_model} if self.wire else {}
        out = {"model": m, "ffs": f, "wire": w}
        if self.pump is not None:
            out["pump"] = self.pump.stats()
        return out

    def stop(self) -> None:
        if self.gadget is not None:
            self.gadget.stop()           # closes the pump too (before the wire's fd goes)
            self.gadget = None
        self.pump = None
        if self.wire is not None:
            self.wire.close()
            self.wire = None

    def __enter__(self) -> "PegasusRig":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- CLI -----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("pegasus_gadget: needs root (configfs, functionfs, network namespaces)", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    quiet_ipv6()
    with PegasusRig(RigConfig(netns=args.netns, peer_ip=args.peer_ip)) as rig:
        line = {"event": "serving", "usb": "07a6:8515", "host_device": str(rig.host_device),
                "netns": args.netns, "peer": _addr(args.peer_ip)}
        if args.kernel_driver:
            modprobe("pegasus")
            name = wait_netdev(rig.host_device, "pegasus")
            configure_host_side(name, args.host_ip)
            line.update(kernel_netdev=name, host=_addr(args.host_ip))
        print(json.dumps(line), flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set() and (end is None or time.monotonic() < end):
            stop.wait(0.2)
        print(json.dumps({"event": "stopped", **rig.counters()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pegasus_gadget", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the pegasus model until SIGTERM/SIGINT or --duration")
    s.add_argument("--duration", type=float, default=None)
    s.add_argument("--netns", default=NETNS)
    s.add_argument("--peer-ip", default=PEER_IP)
    s.add_argument("--host-ip", default=HOST_IP)
    s.add_argument("--kernel-driver", action="store_true",
                   help="load pegasus.ko and configure its netdev with --host-ip")
    s.set_defaults(fn=cmd_serve)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except GadgetError as e:
        print(f"pegasus_gadget: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
