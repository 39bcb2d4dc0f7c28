"""`udrv bench aqm`: latency under load through an embedded USB model whose wire is the bottleneck.

Each setting runs `udrv run model:DRIVER --wire-mbit N --wire-delay-ms D` (the model NAKs bulk
OUT transfers while its wire is busy, as a real NIC does, and each frame reaches the peer D ms
later: a path beyond the LAN, where TCP's window outgrows what the wire holds and the queue in
front of the device stands), then iperf3 TCP from the host to the peer namespace for S seconds
with a ping every 100 ms beside it. On the host, not in a TCG guest: the queue in front
of the device stands, as behind a real 100 Mbit/s dongle, and what CoDel does with it shows.
Reported per setting: throughput, the sending TCP's mean RTT, the ping's median and 90th
percentile, and CoDel's drops and marks (udrv status). Settings are UDRV_AQM values.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..peer import PeerConfig

SETTINGS = ("on", "off", "1/10")


@dataclass
class AqmRun:
    setting: str
    mbit: float | None = None
    tcp_rtt_ms: float | None = None
    ping_p50_ms: float | None = None
    ping_p90_ms: float | None = None
    pings: int = 0
    aqm: dict = field(default_factory=dict)
    error: str = ""


def _udrv(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "udrv.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _status(ifname: str) -> dict:
    r = _udrv("status", "--ifname", ifname, "--json")
    if r.returncode != 0:
        raise RuntimeError(f"udrv status: {r.stderr.strip()}")
    return json.loads(r.stdout)


def _wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def one(setting: str, driver: str, ifname: str, wire_mbit: float, seconds: float, delay_ms: float) -> AqmRun:
    cfg = PeerConfig.for_interface(ifname)
    res = AqmRun(setting)
    env = dict(os.environ, UDRV_AQM=setting)
    log = tempfile.TemporaryFile("w+")     # the daemon's log, for the error line (a pipe could fill)
    p = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", f"model:{driver}", "--ifname", ifname,
                          "--wire-mbit", str(wire_mbit), "--wire-delay-ms", str(delay_ms),
                          "--duration", str(seconds + 60)], env=env,
                         stdout=subprocess.DEVNULL, stderr=log, text=True)
    srv = ping = None
    try:
        _wait(lambda: p.poll() is not None or _status(ifname)["state"] == "up", 30,
              f"udrv run model:{driver} to come up")
        if p.poll() is not None:
            raise RuntimeError(f"udrv run model:{driver} exited with {p.returncode}")
        ns = ["ip", "netns", "exec", cfg.netns]
        _wait(lambda: subprocess.run(["busybox", "ping", "-c", "1", "-W", "1", cfg.peer_addr],
                                     capture_output=True).returncode == 0, 20, "the peer to answer")
        srv = subprocess.Popen(ns + ["iperf3", "-s", "-1", "-B", cfg.peer_addr], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        before = _status(ifname)["tx_journal"]
        ping = subprocess.Popen(["busybox", "ping", "-i", "0.1", "-w", str(int(seconds) + 1), cfg.peer_addr],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = subprocess.run(["iperf3", "-c", cfg.peer_addr, "-t", str(seconds), "-J"], capture_output=True,
                             text=True, timeout=seconds + 30).stdout
        pings = ping.communicate(timeout=30)[0]
        after = _status(ifname)["tx_journal"]
        j = json.loads(out)
        if "error" in j:
            raise RuntimeError(f"iperf3: {j['error']}")
        from .sidebyside import tcp_sender_rtt_ms
        res.mbit = round(j["end"]["sum_received"]["bits_per_second"] / 1e6, 1)
        res.tcp_rtt_ms = tcp_sender_rtt_ms(j)
        # the first second is left out (iperf3's start, TCP's slow start), and what came after the
        # flow ended
        ms = sorted(float(t) for seq, t in re.findall(r"seq=(\d+) ttl=\d+ time=([\d.]+) ms", pings)
                    if 10 <= int(seq) < 10 * seconds)
        if ms:
            res.pings = len(ms)
            res.ping_p50_ms, res.ping_p90_ms = ms[len(ms) // 2], ms[int(len(ms) * 0.9)]
        res.aqm = {k: after[k] - before[k] for k in ("aqm_drops", "aqm_marks")}
    except Exception as e:              # noqa: BLE001 - reported in the table, the next setting runs
        res.error = f"{type(e).__name__}: {e}"
    finally:
        for proc in (srv, ping):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if res.error:
            log.seek(0)
            res.error += f" (daemon: {log.read()[-300:].strip()})"
        log.close()
    return res


def run(settings: tuple[str, ...] = SETTINGS, driver: str = "pegasus", ifname: str = "udrvq0",
        wire_mbit: float = 100.0, seconds: float = 10.0, rounds: int = 2, delay_ms: float = 20.0) -> list[AqmRun]:
    """Every setting once per round, in turn (the host's load drifts: rounds interleave)."""
    return [one(s, driver, ifname, wire_mbit, seconds, delay_ms) for _ in range(rounds) for s in settings]


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def report(runs: list[AqmRun], driver: str, wire_mbit: float, seconds: float, delay_ms: float) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} ms"
    lines = [f"udrv bench aqm: iperf3 TCP host -> peer through the embedded {driver} model, its wire at "
             f"{wire_mbit:g} Mbit/s with {delay_ms:g} ms to the peer, {seconds:g} s per run, a ping every 100 ms "
             "beside the flow "
             "(medians over the runs of each setting; UDRV_AQM: on = CoDel 5 ms / 100 ms with ECN, "
             "T/I = target/interval in ms, off = no AQM)", "",
             "| UDRV_AQM | runs | Mbit/s | TCP RTT under load | ping p50 | ping p90 | CoDel drops / marks |",
             "|---|---|---|---|---|---|---|"]
    for s in dict.fromkeys(r.setting for r in runs):
        mine = [r for r in runs if r.setting == s and not r.error]
        if not mine:
            lines.append(f"| {s} | 0 | failed: {next(r.error for r in runs if r.setting == s)} | | | | |")
            continue
        mbit = _median([r.mbit for r in mine])
        lines.append(f"| {s} | {len(mine)} | {mbit:.1f} | {ms(_median([r.tcp_rtt_ms for r in mine]))} | "
                     f"{ms(_median([r.ping_p50_ms for r in mine]))} | {ms(_median([r.ping_p90_ms for r in mine]))} | "
                     f"{sum(r.aqm.get('aqm_drops', 0) for r in mine)} / {sum(r.aqm.get('aqm_marks', 0) for r in mine)} |")
    failed = [r for r in runs if r.error]
    lines += [f"- {r.setting}: {r.error}" for r in failed]
    return "\n".join(lines)
