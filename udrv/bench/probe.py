"""The Xen paper's interruption probe: a UDP packet every `interval` across the NIC to an
echo server; the interruption is the largest gap between consecutive replies.

The probe runs in its own process so that it never waits for the daemon's interpreter lock:
a gap it reports is a gap on the wire, not a scheduling artefact of the measuring side. Its
loop runs in C when udrv._rigs is built (native/rigs/probe.h; so does the echo server's): a
Python loop at 1 kHz costs a TCG guest a large share of a vCPU and adds its own jitter.
(CLOCK_MONOTONIC is system-wide, so its reply times compare with the caller's.)
"""
from __future__ import annotations

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


@dataclass
class ProbeResult:
    sent: int = 0
    received: int = 0            # distinct probes answered
    duplicates: int = 0          # answers to a probe already answered (a re-issued frame the device had sent)
    max_gap_ms: float = 0.0
    loop: str = ""               # "c" (native/rigs/probe.h) or "python": which instrument measured
    gaps_over_5ms: list[tuple[float, float]] = field(default_factory=list)  # (at, gap ms)

    @property
    def lost(self) -> int:
        return self.sent - self.received


class GapProbe:
    def __init__(self, host: str, port: int = 7777, interval: float = 0.001):
        self.args = [sys.executable, "-m", "udrv.bench.probe", host, str(port), str(interval)]
        self.result = ProbeResult()
        self.times: list[float] = []      # monotonic reply times (filled by stop())
        self._proc: subprocess.Popen | None = None

    def start(self) -> "GapProbe":
        self.t0 = time.monotonic()
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        # wait until the probe has its signal handlers (interpreter start-up takes seconds in a
        # TCG guest; a signal before that would kill it)
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the UDP probe process did not start")
        return self

    def received_so_far(self) -> int:
        """Replies so far (asks the probe process; cheap enough for a readiness check)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGUSR1)
        line = self._proc.stdout.readline()
        return int(line) if line.strip() else 0

    def max_gap_ms(self, start: float, end: float) -> float:
        """Largest gap between consecutive replies that overlaps [start, end] (monotonic)."""
        best = 0.0
        for a, b in zip(self.times, self.times[1:]):
            if b >= start and a <= end:
                best = max(best, (b - a) * 1000)
        return best

    def stop(self) -> ProbeResult:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=10)
        data = json.loads(out.strip().splitlines()[-1])
        self.times = data["times"]
        self.result.sent = data["sent"]
        self.result.received = len(self.times)
        self.result.duplicates = data.get("duplicates", 0)
        self.result.loop = data.get("loop", "")
        for a, b in zip(self.times, self.times[1:]):
            gap = (b - a) * 1000
            self.result.max_gap_ms = max(self.result.max_gap_ms, gap)
            if gap > 5:
                self.result.gaps_over_5ms.append((a - self.t0, gap))
        return self.result


# probes recorded by the C loop: 17 minutes at 1 ms (9 MB); later answers are counted, not kept
_C_CAP = 1 << 20


def _probe_main_c(host: str, port: int, interval: float) -> bool:
    """The probe's loop in C (native/rigs/probe.h): False when udrv._rigs is not built."""
    if os.environ.get("UDRV_PROBE_LOOP") == "python":      # to compare the two instruments
        return False
    try:
        # udrv._rigs itself, not udrv.testbed.rigs: the gadget modules that package imports take
        # ~90 ms on the host, over a second in a TCG guest, before the first probe
        from .._rigs import ffi, lib
    except ImportError:
        return False
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.setblocking(False)
    p = ffi.new("struct udrv_probe *")
    times = ffi.new("double[]", _C_CAP)
    answered = ffi.new("uint8_t[]", _C_CAP)
    p.fd, p.interval_ns, p.cap, p.times, p.answered = sock.fileno(), int(interval * 1e9), _C_CAP, times, answered
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGUSR1, lambda *_: print(p.received, flush=True))
    print("ready", flush=True)
    while not stop[0]:
        lib.udrv_probe_turn(p, 100)       # back at least every 100 ms, at once on a signal
    print(json.dumps({"sent": p.sent, "times": list(ffi.unpack(times, p.received)),
                      "duplicates": p.duplicates, "loop": "c"}), flush=True)
    return True


def _probe_main(host: str, port: int, interval: float) -> None:
    if _probe_main_c(host, port, interval):
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.1)
    stop = threading.Event()
    times: list[float] = []          # arrival of the first answer to each probe
    answered: set[int] = set()
    duplicates = 0
    sent = [0]

    def sender() -> None:
        seq = 0
        nxt = time.monotonic()
        while not stop.is_set():
            try:
                sock.sendto(struct.pack("!Q", seq), (host, port))
                sent[0] += 1
            except OSError:
                pass
            seq += 1
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: print(len(times), flush=True))
    print("ready", flush=True)
    threading.Thread(target=sender, daemon=True).start()
    while not stop.is_set():
        try:
            data = sock.recv(64)
        except (socket.timeout, OSError):
            continue
        seq = struct.unpack("!Q", data[:8])[0] if len(data) >= 8 else -1
        if seq in answered:
            # at-least-once: a frame re-issued after a recovery that the device had already sent
            duplicates += 1
            continue
        answered.add(seq)
        times.append(time.monotonic())
    print(json.dumps({"sent": sent[0], "times": times, "duplicates": duplicates, "loop": "python"}), flush=True)


if __name__ == "__main__":
    _probe_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
