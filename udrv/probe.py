"""The Xen paper's interruption probe: a UDP packet every `interval` across the NIC to an
echo server; the interruption is the largest gap between consecutive replies."""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    sent: int = 0
    received: int = 0
    max_gap_ms: float = 0.0
    gaps_over_5ms: list[tuple[float, float]] = field(default_factory=list)  # (at, gap ms)

    @property
    def lost(self) -> int:
        return self.sent - self.received


class GapProbe:
    def __init__(self, host: str, port: int = 7777, interval: float = 0.001):
        self.addr = (host, port)
        self.interval = interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.2)
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._times: list[float] = []
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def start(self) -> "GapProbe":
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        seq = 0
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sock.sendto(struct.pack("!Qd", seq, time.monotonic()), self.addr)
                self.result.sent += 1
            except OSError:
                pass
            seq += 1
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(64)
            except (socket.timeout, OSError):
                continue
            self._times.append(time.monotonic())
            self.result.received += 1

    def stop(self) -> ProbeResult:
        self._stop.set()
        for t in self._threads:
            t.join(1.0)
        ts = self._times
        for a, b in zip(ts, ts[1:]):
            gap = (b - a) * 1000
            self.result.max_gap_ms = max(self.result.max_gap_ms, gap)
            if gap > 5:
                self.result.gaps_over_5ms.append((a - self.t0, gap))
        self.sock.close()
        return self.result
