"""`udrv bench failover`: the driver domain's figures, measured from the user's side.

For each embedded model, `udrv run model:X` as a user starts it (supervisor, worker, warm
spare), with iperf3 TCP through the interface, a 1 ms UDP probe to an echo server in the
peer namespace (udrv/bench/probe.py: the interruption is the largest gap between replies
around each fault) and 1 ms sequence-numbered datagrams counted at the peer
(udrv/bench/seqsink.py: TX frames lost or duplicated across all the failovers). The worker is
killed, crashed (SIGSEGV in C), stopped and sent into a C busy loop, one at a time, the next
once a new spare is ready. Reported per fault: interruption, detection and failover
percentiles; at the end, the supervisor's fds and children before and after (leaks), whether
the TCP flow survived, and TCP throughput supervised / in-process for the same model in the
same invocation (what the process boundary of a model costs: its transport crosses it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..control import request
from ..peer import PeerConfig
from .probe import GapProbe
from .seqsink import SeqSender

KINDS = ("kill", "segv", "stop", "spin")
DEFAULT_COUNTS = {"kill": 50, "segv": 50, "stop": 20, "spin": 20}
RUN_DIR = "/tmp/udrv-bench-run"


@dataclass
class DriverRun:
    driver: str
    gaps: dict[str, list[float]] = field(default_factory=dict)          # kind -> probe gap per fault (ms)
    detection: dict[str, list[float]] = field(default_factory=dict)
    failover: dict[str, list[float]] = field(default_factory=dict)
    cold: int = 0                       # failovers without a ready spare
    sent: int = 0
    lost: int = 0
    lost_offsets: list[float] = field(default_factory=list)   # each lost datagram: ms after the nearest fault (< 0: before)
    aqm_drops: int = 0                  # frames (of any flow) the journal's CoDel dropped on purpose over the run
    duplicates: int = 0
    probe_lost: int = 0
    probe_sent: int = 0
    tcp_ok: bool = False
    tcp_mbit: float = 0.0
    tcp_stalls: int = 0                 # one-second intervals in which the flow carried nothing
    fds: tuple[int, int] = (0, 0)
    children: tuple[int, int] = (0, 0)
    zombies: int = 0
    unprompted: int = 0                 # failovers nothing was injected for (a false freeze, a real fault)
    ifindex_same: bool = False
    ratio: dict[str, float] = field(default_factory=dict)   # "tx"/"rx": supervised / in-process TCP
    error: str = ""


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _wait(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False


def _status(ifname: str) -> dict[str, Any]:
    r = request(ifname, {"cmd": "status"}, timeout=5.0)
    if not r.get("ok"):
        raise RuntimeError(r.get("error"))
    return r["status"]


def _spare_ready(ifname: str) -> bool:
    st = _status(ifname)
    return bool(st["spare"] and st["spare"]["state"] == "idle" and st["worker"] and st["worker"]["state"] == "running")


def _children(pid: int) -> tuple[int, int]:
    n = z = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                n += 1
                z += fields[0] == "Z"
    return n, z


class _Daemon:
    def __init__(self, driver: str, ifname: str, *extra: str, tcp: bool = False):
        self.ifname = ifname
        env = dict(os.environ, UDRV_RUN_DIR=RUN_DIR)
        os.environ["UDRV_RUN_DIR"] = RUN_DIR
        self.log = open(f"/tmp/udrv-bench-failover-{driver}{'-in-process' if extra else ''}"
                        f"{'-tcp' if tcp else ''}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", f"model:{driver}", "--ifname", ifname,
                                      "--duration", "3600", "--swap-after", "0", "--give-up-after", "1000", *extra],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.cfg = PeerConfig.for_interface(ifname)
        self.netns = ["ip", "netns", "exec", self.cfg.netns]
        if not _wait(lambda: _status(ifname)["state"] == "up", 30):
            self.close()
            raise RuntimeError(f"the daemon on model:{driver} did not come up (see {self.log.name})")
        self.echo = subprocess.Popen([*self.netns, sys.executable, "-m", "udrv.bench.echo"])
        self.iperf_s = subprocess.Popen([*self.netns, "iperf3", "-s"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def close(self) -> None:
        for p in (getattr(self, "echo", None), getattr(self, "iperf_s", None)):
            if p is not None:
                p.kill()
                p.wait()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _tcp(peer: str, seconds: float, reverse: bool) -> float:
    r = subprocess.run(["iperf3", "-c", peer, "-t", str(seconds), "-J", *(["-R"] if reverse else [])],
                       capture_output=True, text=True, timeout=seconds + 30)
    try:
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return 0.0


def throughput_ratio(driver: str, ifname: str, seconds: float) -> dict[str, float]:
    """TCP both ways, supervised then in-process, same model, same invocation."""
    out: dict[str, dict[str, float]] = {}
    for mode, extra in (("supervised", ()), ("in-process", ("--in-process",))):
        d = _Daemon(driver, ifname, *extra, tcp=True)
        try:
            out[mode] = {"tx": _tcp(d.cfg.peer_addr, seconds, False), "rx": _tcp(d.cfg.peer_addr, seconds, True)}
        finally:
            d.close()
    return {k: out["supervised"][k] / out["in-process"][k] if out["in-process"][k] else float("nan")
            for k in ("tx", "rx")} | {f"{m}_{k}_mbit": out[m][k] for m in out for k in ("tx", "rx")}


def run_driver(driver: str, ifname: str, counts: dict[str, int], spacing: float) -> DriverRun:
    res = DriverRun(driver)
    d = _Daemon(driver, ifname)
    try:
        if not _wait(lambda: _spare_ready(ifname), 30):
            raise RuntimeError("no warm spare came up")
        st0 = _status(ifname)
        sup = st0["supervisor"]["pid"]
        fds0, kids0 = len(os.listdir(f"/proc/{sup}/fd")), _children(sup)[0]
        idx0, n0 = st0["ifindex"], st0["failovers"]
        aqm0 = st0["tx_journal"]["aqm_drops"]
        total = sum(counts.values())
        iperf = subprocess.Popen(["iperf3", "-c", d.cfg.peer_addr, "-t", str(int(total * spacing * 2 + 30)), "-J",
                                  "-b", "20M"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        probe = GapProbe(d.cfg.peer_addr, interval=0.001).start()
        seq = SeqSender(d.cfg.peer_addr, d.netns)
        seq.start()
        time.sleep(1.0)
        # interleaved, so a slow drift of the host does not land on one kind
        order = [k for _at, k in sorted(((i + 0.5) / c, k) for k, c in counts.items() if c for i in range(c))]
        marks: list[tuple[str, float]] = []
        try:
            for n, kind in enumerate(order):
                before = _status(ifname)["failovers"]
                t = time.monotonic()
                r = request(ifname, {"cmd": "inject", "entry": "worker", "kind": kind})
                if not r.get("ok"):
                    raise RuntimeError(f"inject worker {kind}: {r.get('error')}")
                marks.append((kind, t))
                if not _wait(lambda: _status(ifname)["failovers"] > before
                             and _status(ifname)["last_failover"]["failover_ms"] is not None, 10):
                    raise RuntimeError(f"no failover after worker {kind} (#{n})")
                f = _status(ifname)["last_failover"]
                res.detection.setdefault(kind, []).append(f["detection_ms"])
                res.failover.setdefault(kind, []).append(f["failover_ms"])
                res.cold += not f["spare_ready"]
                _wait(lambda: _spare_ready(ifname), 20)
                time.sleep(max(0.0, spacing - (time.monotonic() - t)))
                print(f"bench: {driver} {n + 1}/{len(order)} {kind}", file=sys.stderr, end="\r", flush=True)
        except Exception as e:           # what was measured up to here is still reported
            res.error = str(e)
        time.sleep(0.5)
        count = seq.finish(linger=1.0)
        pr = probe.stop()
        for kind, t in marks:
            res.gaps.setdefault(kind, []).append(probe.max_gap_ms(t - 0.002, t + 0.25))
        res.sent, res.lost, res.duplicates = count.sent, count.lost, count.duplicates
        res.lost_offsets = [min((at - t for _k, t in marks), key=abs) * 1000 for at in count.missing_at] if marks else []
        res.probe_sent, res.probe_lost = pr.sent, pr.lost
        iperf.send_signal(signal.SIGINT)
        out, _ = iperf.communicate(timeout=30)
        try:
            # stopped by SIGINT, iperf3 reports "interrupt" and still gives its intervals: the flow
            # survived if it never stood still a whole second and carried data to the end
            j = json.loads(out)
            per_s = [iv["sum"]["bits_per_second"] for iv in j.get("intervals", [])]
            res.tcp_stalls = sum(1 for x in per_s if x == 0)
            error = str(j.get("error", ""))
            res.tcp_ok = bool(per_s) and per_s[-1] > 0 and (not error or "interrupt" in error)
            res.tcp_mbit = sum(per_s) / len(per_s) / 1e6 if per_s else 0.0
        except (ValueError, KeyError, TypeError):
            res.tcp_ok = False
        time.sleep(0.5)
        st = _status(ifname)
        res.fds = (fds0, len(os.listdir(f"/proc/{sup}/fd")))
        kids, res.zombies = _children(sup)
        res.children = (kids0, kids)
        res.ifindex_same = st["ifindex"] == idx0
        res.aqm_drops = st["tx_journal"]["aqm_drops"] - aqm0
        res.unprompted = st["failovers"] - n0 - len(marks)
    except Exception as e:
        res.error = str(e)
    finally:
        d.close()
    return res


def report(runs: list[DriverRun], counts: dict[str, int]) -> str:
    lines = ["failover: each embedded model under `udrv run` (supervisor, worker, warm spare) with iperf3 TCP "
             "(20 Mbit/s) through it; interruption = the largest gap between replies of a 1 ms UDP probe from "
             "250 ms after the fault back to 2 ms before it; detection = the dead worker's last heartbeat to the "
             "supervisor knowing; failover = knowing to the successor up (device restored, journal re-issued). "
             f"Faults per driver: {', '.join(f'{k} x{v}' for k, v in counts.items() if v)}.", ""]
    for r in runs:
        lines += [f"### {r.driver}", ""]
        if r.error:
            lines += [f"FAILED: {r.error}", ""]
        lines += ["| worker fault | n | interruption p50 | p99 | max | detection p50 | p99 | failover p50 | p99 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in KINDS:
            g = r.gaps.get(k, [])
            if not g:
                continue
            de, fo = r.detection.get(k, []), r.failover.get(k, [])
            lines.append(f"| {k} | {len(g)} | {_pct(g, .5):.1f} ms | {_pct(g, .99):.1f} ms | {max(g):.1f} ms | "
                         f"{_pct(de, .5):.1f} ms | {_pct(de, .99):.1f} ms | {_pct(fo, .5):.1f} ms | "
                         f"{_pct(fo, .99):.1f} ms |")
        allg = [x for v in r.gaps.values() for x in v]
        under = sum(1 for x in allg if x < 10) / len(allg) * 100 if allg else 0.0
        lines += ["", f"- under 10 ms: {under:.0f} % of {len(allg)} failovers (the Xen warm spare: 91 %); "
                      f"cold starts (no spare ready): {r.cold}; failovers nothing was injected for: {r.unprompted}",
                  f"- TX datagrams counted at the peer: {r.sent} sent, {r.lost} lost, {r.duplicates} duplicated; "
                  f"probe {r.probe_lost}/{r.probe_sent} unanswered (RX may drop during a failover)",
                  f"- the lost datagrams were sent this long after the nearest fault (ms): "
                  f"{', '.join(f'{x:.0f}' for x in sorted(r.lost_offsets)[:30]) or 'none'}; the journal's CoDel "
                  f"dropped {r.aqm_drops} frames of all flows on purpose meanwhile (UDRV_AQM=off to compare)",
                  f"- TCP flow {'survived' if r.tcp_ok else 'did NOT survive'} ({r.tcp_mbit:.1f} Mbit/s over the run, "
                  f"{r.tcp_stalls} one-second intervals with nothing through); "
                  f"ifindex {'unchanged' if r.ifindex_same else 'CHANGED'}",
                  f"- supervisor fds {r.fds[0]} -> {r.fds[1]}, children {r.children[0]} -> {r.children[1]}, "
                  f"zombies {r.zombies}"]
        if r.ratio:
            lines.append(f"- TCP supervised / in-process: TX {r.ratio['tx']:.2f} "
                         f"({r.ratio['supervised_tx_mbit']:.0f} / {r.ratio['in-process_tx_mbit']:.0f} Mbit/s), RX "
                         f"{r.ratio['rx']:.2f} ({r.ratio['supervised_rx_mbit']:.0f} / "
                         f"{r.ratio['in-process_rx_mbit']:.0f} Mbit/s)")
        lines.append("")
    return "\n".join(lines)


def failover_bench(drivers: list[str], ifname: str, counts: dict[str, int] | None = None, spacing: float = 0.7,
                   tcp_seconds: float = 5.0) -> int:
    counts = counts or dict(DEFAULT_COUNTS)
    runs = []
    for drv in drivers:
        r = run_driver(drv, ifname, counts, spacing)
        if tcp_seconds > 0 and not r.error:
            try:
                r.ratio = throughput_ratio(drv, ifname, tcp_seconds)
            except Exception as e:
                r.error = f"throughput ratio: {e}"
        runs.append(r)
        print(file=sys.stderr)
    print(report(runs, counts))
    return 0 if all(not r.error for r in runs) else 1
