"""Benchmarks (commands, not tests): each reports a ratio against a baseline in the same run."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class GuardOverhead:
    frames: int
    size: int
    on_fps: list[float] = field(default_factory=list)
    off_fps: list[float] = field(default_factory=list)
    guard_ns: float = 0.0          # added cost of one guarded datapath call (min of repeats)
    calls_per_frame: float = 0.0   # guarded datapath calls per frame moved, counted in a round

    @property
    def ratio(self) -> float:
        return statistics.median(a / b for a, b in zip(self.on_fps, self.off_fps))

    def setup(self) -> str:
        """What was measured (the first line of the report)."""
        return (f"guard overhead, pegasus driver on the pegasus model, {self.frames} frames of {self.size} B "
                f"TX + RX per round, {len(self.on_fps)} interleaved rounds")

    def report(self) -> str:
        on, off = statistics.median(self.on_fps), statistics.median(self.off_fps)
        pairs = [a / b for a, b in zip(self.on_fps, self.off_fps)]
        return (f"{self.setup()}\n"
                f"  guards on : {on:,.0f} frames/s (median)\n"
                f"  guards off: {off:,.0f} frames/s (median)\n"
                f"  ratio on/off = {self.ratio:.3f} (median of per-round ratios; range {min(pairs):.3f}..{max(pairs):.3f};"
                f" target >= 0.98)\n  (CPU time of this process, so other load on the machine disturbs it less)\n"
                f"  cross-check: a guarded call costs {self.guard_ns:.0f} ns more than a bare one (min of repeats), "
                f"{self.calls_per_frame:.3f} guarded calls per frame, {1e9 / off:.0f} ns per frame unguarded -> "
                f"expected ratio {self.expected_ratio:.4f}")

    @property
    def expected_ratio(self) -> float:
        per_frame = 1e9 / statistics.median(self.off_fps)
        return per_frame / (per_frame + self.guard_ns * self.calls_per_frame)


def _guard_call_ns(repeats: int = 7, n: int = 200_000) -> float:
    """Added cost of Guard.datapath over calling the function directly, in ns per call."""
    from ..guard import Guard

    class _Drv:
        soft = None

    def fn() -> int:
        return 0

    g = Guard(_Drv())
    best_on = best_off = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            g.datapath("xmit", fn)
        best_on = min(best_on, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best_off = min(best_off, time.perf_counter() - t0)
    return max(0.0, (best_on - best_off) / n * 1e9)


def _round(guards: bool, frames: int, size: int, calls: list[int] | None = None) -> float:
    from ..drivers.pegasus import Pegasus
    from ..models.usb import ModelUsbTransport
    from ..models.pegasus import PegasusModel
    from ..nic import Nic, NicOptions

    model = PegasusModel()
    sink_count = [0]

    def sink(frame: bytes) -> None:
        sink_count[0] += 1

    model.on_transmit = lambda f: model.wire_receive(f[6:12] + f[:6] + f[12:])   # echo back to us
    nic = Nic(Pegasus, ModelUsbTransport(model), sink, NicOptions(guards=guards, n_rx=8, n_tx=8))
    nic.bring_up()
    nic.open()
    if calls is not None:
        inner = nic.guard.datapath

        def counting(*a):
            calls[0] += 1
            return inner(*a)
        nic.guard.datapath = counting
    peer = bytes.fromhex("02aabbccdd01")
    frame = peer + nic.mac + b"\x88\xb5" + bytes(size - 14)
    batch = [frame] * 32
    t0 = time.process_time()   # CPU time: less disturbed by other load on a shared machine
    sent = 0
    while sent < frames:
        nic.enqueue(batch)
        sent += len(batch)
        while nic.journal.unconfirmed():
            nic.xmit()
            nic.poll(0.0)
    while sink_count[0] < sent and nic.poll(0.001):
        pass
    dt = time.process_time() - t0
    nic.close()
    return (sent + sink_count[0]) / dt


def guard_overhead(frames: int = 20000, rounds: int = 7, size: int = 64) -> GuardOverhead:
    res = GuardOverhead(frames, size)
    calls = [0]
    _round(True, 2000, size, calls)     # warm-up, and count guarded calls per frame
    res.calls_per_frame = calls[0] / (2 * 2016)
    res.guard_ns = _guard_call_ns()
    for i in range(rounds):
        # alternate which goes first so drift on a shared machine hits both equally
        order = (True, False) if i % 2 == 0 else (False, True)
        for g in order:
            (res.on_fps if g else res.off_fps).append(_round(g, frames, size))
    return res


# --- recovery latency, the Xen paper's way ------------------------------------------------------

def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def shorter_above_floor(ck: list[float], rs: list[float], ck_idle: list[float], rs_idle: list[float],
                        min_extra_ms: float = 1.0) -> str:
    """How much shorter the checkpoint's p50 gap is than the restart's once each run's idle p50
    (the gap with nothing injected) is taken off: '-' without an idle row or when the restart
    adds less than `min_extra_ms` above its floor (a ratio of two noise-sized numbers says nothing)."""
    if not (ck and rs and ck_idle and rs_idle):
        return "-"
    extra_ck = max(0.0, percentile(ck, 50) - percentile(ck_idle, 50))
    extra_rs = percentile(rs, 50) - percentile(rs_idle, 50)
    return f"{(1 - extra_ck / extra_rs) * 100:.0f}%" if extra_rs >= min_extra_ms else "-"


@dataclass
class RecoveryLatency:
    mode: str
    driver: str = "pegasus"
    gaps: dict[str, list[float]] = field(default_factory=dict)       # fault -> max gap per injection (ms)
    recovery_ms: dict[str, list[float]] = field(default_factory=dict)
    baseline_gap_ms: float = 0.0
    lost: int = 0
    sent: int = 0
    outcomes: list[str] = field(default_factory=list)    # of the daemon's recent recoveries


class RecoveryLatencyScenario:
    """Inject each fault `repeats` times while a 1 ms UDP probe runs; the interruption per
    fault is the largest gap between probe replies around it."""

    def __init__(self, mode: str, faults: list[str], repeats: int, ifname: str, spacing: float = 0.55,
                 driver: str = "pegasus"):
        self.result = RecoveryLatency(mode, driver)
        self.faults, self.repeats, self.ifname, self.spacing = faults, repeats, ifname, spacing
        self.exit_code = 1

    def start(self, daemon, peer) -> None:
        import threading
        self.daemon, self.peer = daemon, peer
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import subprocess
        import sys
        from ..control import request
        from .probe import GapProbe
        echo = subprocess.Popen(self.peer.netns_exec(sys.executable, "-m", "udrv.bench.echo"))
        try:
            time.sleep(0.5)
            probe = GapProbe(self.peer.cfg.peer_addr, interval=0.001).start()
            time.sleep(1.0)
            base = (time.monotonic(), time.monotonic() + 1.0)
            time.sleep(1.0)
            promisc = False
            marks: list[tuple[str, float]] = []
            for f in ["none (control)"] + self.faults:
                entry, kind = f.split(":") if ":" in f else ("", "")
                for _ in range(self.repeats):
                    if entry:    # the control windows inject nothing: the machine's own noise
                        r = request(self.ifname, {"cmd": "inject", "entry": entry, "kind": kind})
                        if not r.get("ok"):
                            raise RuntimeError(r.get("error"))
                    t = time.monotonic()
                    if entry == "set_rx_mode":
                        promisc = not promisc
                        subprocess.run(["ip", "link", "set", self.ifname, "promisc", "on" if promisc else "off"],
                                       check=False)
                    marks.append((f, t))
                    time.sleep(self.spacing if entry != "link_check" else 1.2)
            time.sleep(0.3)
            res = probe.stop()
            self.result.sent, self.result.lost = res.sent, res.lost
            self.result.baseline_gap_ms = probe.max_gap_ms(*base)
            for f, t in marks:
                self.result.gaps.setdefault(f, []).append(probe.max_gap_ms(t, t + self.spacing * 0.9))
            st = request(self.ifname, {"cmd": "status"})["status"]
            self.result.recovery_ms["all"] = [r["recovery_ms"] for r in st["recent_recoveries"]]
            self.result.outcomes = [r["outcome"] for r in st["recent_recoveries"]]
            self.exit_code = 0
        except Exception as e:
            print(f"bench: failed: {e}", file=sys.stderr)
        finally:
            echo.terminate()
            self.daemon.stop()


def recovery_latency(drivers: list[str], faults: list[str], repeats: int, ifname: str) -> int:
    """`udrv bench recovery`: each driver's daemon on its embedded model, once per recovery mode,
    the scenario above beside it; prints the report. Exit code 0 when every run finished."""
    import sys
    from ..errors import UdrvError
    from ..service import ServiceOptions, serve
    results = []
    for driver in drivers:
        for mode in ("checkpoint", "restart"):
            sc = RecoveryLatencyScenario(mode, faults, repeats, ifname, driver=driver)
            try:
                code = serve(ServiceOptions(device=f"model:{driver}", ifname=ifname, duration=600, recovery=mode), sc)
            except UdrvError as e:
                code, why = 1, f": {e}"
            else:
                why = ""
            if code != 0:
                print(f"udrv: the {mode} run of {driver} failed{why}", file=sys.stderr)
                return 1
            results.append(sc.result)
    print(recovery_report(results))
    return 0


def recovery_report(results: list[RecoveryLatency]) -> str:
    """One table per driver: the interruption per fault, checkpoint recovery vs full restart."""
    lines = ["recovery latency: each driver on its embedded device model, 1 ms UDP probe across the TAP; "
             "interruption = largest gap between replies in the window after each injected fault; "
             "'none (control)' = the same windows with nothing injected (what the machine's scheduling alone "
             "costs); 'above the idle floor' takes each run's control p50 off both p50s first ('-' when the restart adds under 1 ms above its floor)"]
    for driver in dict.fromkeys(r.driver for r in results):
        ck = next(r for r in results if r.driver == driver and r.mode == "checkpoint")
        rs = next((r for r in results if r.driver == driver and r.mode == "restart"), None)
        lines += ["", f"### {driver}", "",
                  f"baseline (no fault) largest gap: checkpoint run {ck.baseline_gap_ms:.1f} ms"
                  + (f", restart run {rs.baseline_gap_ms:.1f} ms" if rs else ""),
                  "",
                  "| fault | n | checkpoint p50 | checkpoint p99 | full restart p50 | full restart p99 | "
                  "checkpoint shorter by | shorter by, above the idle floor |",
                  "|---|---|---|---|---|---|---|---|"]
        idle = next((f for f in ck.gaps if f.startswith("none")), None)
        for f, gaps in ck.gaps.items():
            rgaps = rs.gaps.get(f, []) if rs else []
            shorter = above = "-"
            if rgaps and not f.startswith("none"):
                shorter = f"{(1 - percentile(gaps, 50) / percentile(rgaps, 50)) * 100:.0f}%"
                if idle and rs:
                    above = shorter_above_floor(gaps, rgaps, ck.gaps[idle], rs.gaps.get(idle, []))
            lines.append(f"| {f} | {len(gaps)} | {percentile(gaps, 50):.1f} ms | {percentile(gaps, 99):.1f} ms | "
                         f"{percentile(rgaps, 50):.1f} ms | {percentile(rgaps, 99):.1f} ms | {shorter} | {above} |")
        lines.append("")
        lines.append(f"probe packets lost: checkpoint {ck.lost}/{ck.sent}"
                     + (f", restart {rs.lost}/{rs.sent}" if rs else ""))
    return "\n".join(lines)
