"""UDP echo: the server for a peer namespace, and the clients tests and benches use to count
what crossed a NIC (`roundtrips` for a fixed set of datagrams, `Flood` for steady traffic)."""
from __future__ import annotations

import argparse
import socket
import threading

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=PORT)
    a = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.port))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)


if __name__ == "__main__":
    main()
