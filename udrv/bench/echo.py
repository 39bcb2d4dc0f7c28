"""UDP echo: the server for a peer namespace, and the clients tests and benches use to count
what crossed a NIC (`roundtrips` for a fixed set of datagrams, `Flood` for steady traffic)."""
from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

PORT = 7777


def roundtrips(dst: str, sizes: list[int], port: int = PORT, timeout: float = 0.5, src: str = "") -> int:
    """UDP datagrams of these payload sizes; returns how many came back intact."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if src:
        s.bind((src, 0))
    s.settimeout(timeout)
    got = 0
    for i, size in enumerate(sizes):
        msg = (b"%06d" % i) + bytes((i + k) & 0xFF for k in range(max(0, size - 6)))
        s.sendto(msg, (dst, port))
        try:
            while True:
                data = s.recv(4096)
                if data[:6] == msg[:6]:       # a late reply to an earlier datagram is skipped
                    got += data == msg
                    break
        except socket.timeout:
            pass
    s.close()
    return got


class Flood(threading.Thread):
    """Steady UDP echo traffic (e.g. while faults are injected); counts what came back."""

    def __init__(self, dst: str, port: int = PORT, interval: float = 0.02):
        super().__init__(daemon=True)
        self.dst, self.port, self.interval = dst, port, interval
        self.sent = self.got = 0
        self.halt = threading.Event()

    def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(self.interval)
        while not self.halt.is_set():
            s.sendto(b"flood%08d" % self.sent + bytes(400), (self.dst, self.port))
            self.sent += 1
            try:
                while True:
                    s.recv(4096)
                    self.got += 1
            except socket.timeout:
                pass
        s.settimeout(0.5)          # collect the stragglers
        try:
            while True:
                s.recv(4096)
                self.got += 1
        except socket.timeout:
            pass
        s.close()


def faults_under_flood(ifname: str, dst: str, faults: Sequence[tuple[str, str]],
                       inject: Callable[[int, str, str], None], settle: Callable[[str], float],
                       warmup: float = 0.5) -> dict:
    """Inject each (entry, kind) into the udrv daemon serving `ifname` while a Flood to `dst`
    runs, wait `settle(entry)` seconds after each, and return what the flood and the daemon saw:
    the outcome of every recovery, the silence it cost, and whether the host's interface (its
    ifindex) stayed the same. `inject(i, entry, kind)` arms the fault (the caller chooses how:
    the CLI a user types, or the control socket) and may provoke the entry point."""
    from ..control import request
    ifindex_path = Path(f"/sys/class/net/{ifname}/ifindex")
    ifindex = ifindex_path.read_text().strip()
    flood = Flood(dst)
    flood.start()
    time.sleep(warmup)
    for i, (entry, kind) in enumerate(faults):
        inject(i, entry, kind)
        time.sleep(settle(entry))
    flood.halt.set()
    flood.join(10)
    r = request(ifname, {"cmd": "status"}, timeout=10.0)
    if not r.get("ok"):
        raise RuntimeError(f"udrv status: {r.get('error')}")
    st = r["status"]
    return {
        "flood_sent": flood.sent, "flood_back": flood.got,
        "recoveries": st["recoveries"], "escalations": st["escalations"], "restarts": st["restarts"],
        "entries": [(x["entry"], x["fault"], x["outcome"]) for x in st["recent_recoveries"]],
        "rolled_back": [(x["entry"], x["fault"], x["rolled_back"]) for x in st["recent_recoveries"]],
        "silent_ms": [x["silent_ms"] for x in st["recent_recoveries"]],
        "ifindex_same": ifindex_path.read_text().strip() == ifindex and st["ifindex"] == int(ifindex),
        "promisc": st["rx_mode"]["promisc"], "unconfirmed": st["tx_journal"]["unconfirmed"],
        "implementation": st.get("implementation"),
        "driver_stats": st.get("driver_stats", {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=PORT)
    a = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.port))
    try:
        from .._rigs import lib          # as the probe loads it (bench/probe.py)
    except ImportError:
        lib = None
    if os.environ.get("UDRV_PROBE_LOOP") == "python":      # the probe's switch covers its echo too
        lib = None
    while lib is not None:               # in C (native/rigs/probe.h): cheap enough not to be measured
        lib.udrv_echo_turn(s.fileno(), 1000)
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)


if __name__ == "__main__":
    main()
