"""Sequence-numbered TX frames counted at the peer: what a failover lost or sent twice.

    python -m udrv.bench.seqsink [--port 7779]     (in the peer namespace) prints, on SIGTERM,
        {"received": distinct sequence numbers, "duplicates": n, "highest": max seq,
         "missing": the first 1000 sequence numbers below the highest it never saw}

`SeqSender` sends one UDP datagram every `interval` from the host through the NIC; a frame
the host handed to the TAP and the peer never saw is a TX loss (invariant 2), one it saw twice
a duplicate (allowed only where a completion was lost). The sender stops, waits `linger`
seconds for the queue to drain, then asks the sink.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PORT = 7779


@dataclass
class SeqCount:
    sent: int
    received: int
    duplicates: int
    missing_at: list[float] = field(default_factory=list)   # when each lost datagram was sent (monotonic; the first 1000)

    @property
    def lost(self) -> int:
        return self.sent - self.received


class SeqSender(threading.Thread):
    def __init__(self, dst: str, netns_exec: list[str], port: int = PORT, interval: float = 0.001):
        super().__init__(daemon=True, name="seq-sender")
        self.dst, self.port, self.interval = dst, port, interval
        self.sent = 0
        self.times: list[float] = []      # send time of each sequence number
        self.halt = threading.Event()
        self.sink = subprocess.Popen([*netns_exec, sys.executable, "-m", "udrv.bench.seqsink", "--port", str(port)],
                                     stdout=subprocess.PIPE, text=True)
        if self.sink.stdout.readline().strip() != "ready":          # type: ignore[union-attr]
            raise RuntimeError("the sequence sink did not start in the peer namespace")

    def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        nxt = time.monotonic()
        while not self.halt.is_set():
            try:
                t = time.monotonic()
                s.sendto(struct.pack("!Q", self.sent), (self.dst, self.port))
                self.times.append(t)
                self.sent += 1
            except OSError:
                pass              # a send the host refused never reached the TAP: not counted as sent
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()
        s.close()

    def finish(self, linger: float = 1.0) -> SeqCount:
        self.halt.set()
        self.join(5)
        time.sleep(linger)
        self.sink.send_signal(signal.SIGTERM)
        out, _ = self.sink.communicate(timeout=10)
        d = json.loads(out.strip().splitlines()[-1])
        missing = [m for m in d.get("missing", []) if m < self.sent]
        return SeqCount(self.sent, d["received"], d["duplicates"], [self.times[m] for m in missing])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=PORT)
    a = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.port))
    s.settimeout(0.1)
    seen: set[int] = set()
    dups = 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.is_set():
        try:
            data = s.recv(64)
        except (socket.timeout, OSError):
            continue
        if len(data) < 8:
            continue
        seq = struct.unpack("!Q", data[:8])[0]
        if seq in seen:
            dups += 1
        seen.add(seq)
    top = max(seen, default=-1)
    missing = [i for i in range(top + 1) if i not in seen][:1000]
    print(json.dumps({"received": len(seen), "duplicates": dups, "highest": top, "missing": missing}), flush=True)


if __name__ == "__main__":
    main()
