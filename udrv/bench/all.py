"""`udrv bench`: udrv next to the Linux kernel's own driver for every device udrv drives, one command.

    udrv bench [sidebyside] [--out DIR] [--seconds S] [--only e1000,cdc_ecm,pegasus] [--smp N]

Each device needs its own QEMU set-up, so this is one guest boot per device, run one after the
other (~15 min in all under TCG), and in each boot the kernel's driver and udrv's drive the very
same device, so every ratio compares like with like:

  e1000    QEMU's e1000 behind an emulated Intel IOMMU: the kernel's e1000, then udrv on vfio-pci
           (C ring, Python ring), recovery latency, the kernel again (`udrv bench e1000`, whose
           full report lands in OUT/e1000/).
  cdc_ecm  the kernel's own configfs f_ecm gadget on dummy_hcd: the kernel's cdc_ether, then
           `udrv run` with udrv's cdc_ecm (Python engine, C transfer ring) (udrv.bench.cdc_ecm).
  pegasus  udrv's pegasus model served through FunctionFS on dummy_hcd: the kernel's pegasus.ko,
           then `udrv run` with udrv's pegasus driver (udrv.bench.pegasus).

Written to OUT (default ./bench-out): report.md (the summary of udrv/kernel ratios against the
targets, then each device's details), sidebyside.png (ratios per device), results.json (all raw
results). A device whose boot fails is reported as failed with the reason; the others still run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UdrvError
from .sidebyside import COLORS, GUEST_ENV, REPO, BenchOptions, run_bench, write_png_bars
from .sidebyside import ratios as e1000_ratios

DEVICES = ("e1000", "cdc_ecm", "pegasus")
TARGET = {"e1000": 0.9, "cdc_ecm": 0.9, "pegasus": 1.0}       # udrv/kernel, from the issue
KERNEL_DRIVER = {"e1000": "e1000", "cdc_ecm": "cdc_ether", "pegasus": "pegasus.ko"}
DEFAULT_SMP = {"e1000": 1, "cdc_ecm": 2, "pegasus": 2}        # USB: the gadget runs in the same guest
GUEST_TIMEOUT = 1200.0


@dataclass(frozen=True)
class Row:
    """One measurement of one udrv datapath against the kernel's driver, same guest boot."""
    device: str
    measurement: str          # e.g. "TCP host -> peer"
    unit: str
    kernel: float
    udrv: float | None        # None: udrv's run failed (error says why)
    variant: str              # which udrv datapath ("C ring", "Python engine", ...)
    error: str = ""
    offered: float | None = None   # a rate test's offered load: both at it says nothing about capacity

    @property
    def ratio(self) -> float:
        if self.udrv is None or not self.kernel:
            return math.nan
        return self.udrv / self.kernel

    @property
    def target(self) -> float:
        return TARGET[self.device]

    @property
    def met(self) -> bool:
        return self.ratio == self.ratio and self.ratio >= self.target

    @property
    def saturated_by_offer(self) -> bool:
        """Both drivers delivered (nearly) all that was offered: the test did not find a limit."""
        return bool(self.offered) and self.udrv is not None and min(self.kernel, self.udrv) >= 0.95 * self.offered

    @property
    def verdict(self) -> str:
        if self.udrv is None:
            return "failed: " + self.error[:80]
        if self.saturated_by_offer:
            return f"both at the offered {self.offered:g}/s: no limit found"
        return "met" if self.met else "below"


@dataclass
class DeviceResult:
    device: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    guest_seconds: float = 0.0
    details: list[str] = field(default_factory=list)     # Markdown lines for this device's section


# --- results -> rows (pure: unit-tested) ------------------------------------------------------------

E1000_MEASUREMENTS = {"tcp_tx": ("TCP host -> peer", "Mbit/s"), "tcp_rx": ("TCP peer -> host", "Mbit/s"),
                      "udp64_tx": ("UDP 64 B host -> peer", "kpps"), "udp64_rx": ("UDP 64 B peer -> host", "kpps")}


def e1000_rows(result: dict) -> list[Row]:
    from .sidebyside import kernel_reference
    ref = kernel_reference(result)
    rows = []
    for name, per in e1000_ratios(result).items():
        case = result["cases"][name]
        variant = case.get("_label", name).removeprefix("udrv ")
        for m, (label, unit) in E1000_MEASUREMENTS.items():
            if m in per:
                rows.append(Row("e1000", label, unit, ref[m], case[m]["value"], variant))
    return rows


# udrv.bench.cdc_ecm's names: both are `udrv run`; "native" as it runs by default (the C
# transfer ring, when the extension is built), "python" with UDRV_DATAPATH=python
CDC_VARIANTS = {"native": "C ring (udrv run)", "native-nocoalesce": "C ring, RX coalescing off",
                "native-nooffload": "C ring, software TX offloads off",
                "native-1thread": "C ring, TX on the daemon's thread",
                "native-noplacement": "C ring, no CPU placement",
                "python": "Python engine", "native-inproc": "C ring, in one process (no supervisor)"}
INPROC = "native-inproc"        # the C ring under `udrv run --in-process`: what the driver domain costs


AQM_VARIANT = "native-aqm="     # + a UDRV_AQM setting: the C ring with CoDel set otherwise


def cdc_variants(res: dict) -> dict[str, str]:
    """The datapaths udrv.bench.cdc_ecm measured, with their labels: the fixed ones, then
    the C ring under each other AQM setting (--compare-aqm)."""
    found = {name: label for name, label in CDC_VARIANTS.items() if name in res}
    found.update({name: f"C ring, UDRV_AQM={name[len(AQM_VARIANT):]}" for name in res
                  if name.startswith(AQM_VARIANT) and not name.endswith(("_more", "_cpu", "_rx_coalesce", "_tx_journal"))})
    return found


CDC_ROUNDS = 3        # C ring runs, each after a kernel run (udrv.bench.cdc_ecm --rounds)


def cdc_runs(res: dict, name: str) -> list[dict]:
    """The measured runs of one datapath in udrv.bench.cdc_ecm's result, in order: the
    kernel's before, between (kernel_more) and after udrv's; a variant's first run and, for the
    C ring, its further rounds (native_more)."""
    if name == "kernel":
        found = [res.get("kernel"), *res.get("kernel_more", []), res.get("kernel_after")]
    else:
        found = [res.get(name), *res.get(f"{name}_more", [])]
    return [r for r in found if isinstance(r, dict) and "tx" in r]


def cdc_ecm_rows(res: dict) -> list[Row]:
    """udrv against the kernel's runs before, between and after udrv's (the host is shared and
    TCG speed drifts): the median of each side's runs (of two: their mean)."""
    runs = cdc_runs(res, "kernel")
    if not runs:
        return []
    k = {way: statistics.median(r[way] for r in runs) for way in ("tx", "rx")}
    rows = []
    for name, variant in cdc_variants(res).items():
        r = res[name]
        mine = cdc_runs(res, name)
        for way, label in (("tx", "TCP host -> peer"), ("rx", "TCP peer -> host")):
            value = None if "error" in r or not mine else statistics.median(x[way] for x in mine)
            rows.append(Row("cdc_ecm", label, "Mbit/s", k[way], value, variant, r.get("error", "")))
    return rows


PEGASUS_UDP_PPS = 10000          # minimum-size frames offered per second each way
PEGASUS_ROUNDS = 2               # pegasus.ko then udrv, twice, then pegasus.ko (udrv.bench.pegasus --rounds)


def pegasus_rows(rep: dict, offered_pps: float | None = None) -> list[Row]:
    """Per direction, the median of udrv's runs against the median of pegasus.ko's (the bench
    alternates them in rounds: TCG speed drifts with the shared host)."""
    runs = rep.get("runs", [])

    def rates(path: str, direction: str) -> list[float]:
        return [r["mbit_s"] for r in runs if (r.get("path"), r.get("direction")) == (path, direction)
                and "error" not in r]

    rows = []
    for d in dict.fromkeys(r["direction"] for r in runs if r.get("path") == "udrv"):
        kern = rates("pegasus.ko", d)
        if not kern:
            continue
        mine = rates("udrv", d)
        err = next((r.get("error", "") for r in runs if (r.get("path"), r.get("direction")) == ("udrv", d)
                    and "error" in r), "")
        unit = "frames/s" if d.startswith("UDP") else "Mbit/s"
        label = d.replace("host->peer", "host -> peer").replace("peer->host", "peer -> host")
        rows.append(Row("pegasus", label, unit, statistics.median(kern),
                        statistics.median(mine) if mine else None, "udrv pegasus", "" if mine else err,
                        offered_pps if unit == "frames/s" else None))
    return rows


# --- running the guests -------------------------------------------------------------------------------

def bench_e1000(out: Path, seconds: float, smp: int) -> DeviceResult:
    d = DeviceResult("e1000")
    dest = out / "e1000"
    rc = run_bench(BenchOptions(out=dest, seconds=seconds, smp=smp))
    res_path = dest / "results.json"
    if not res_path.exists():
        d.error = f"the e1000 bench wrote no results (exit {rc})"
        return d
    d.raw = json.loads(res_path.read_text())
    d.guest_seconds = d.raw.get("host", {}).get("guest_seconds", 0.0)
    d.error = d.raw.get("error", "")
    d.rows = e1000_rows(d.raw)
    d.details = [f"Full report: [e1000/report.md](e1000/report.md) (throughput, where the time goes with a py-spy "
                 "profile, recovery latency: checkpoint vs full restart, 1 ms probe).", ""]
    return d


def _run_tool(module: str, args: list[str], out: Path, smp: int, what: str) -> tuple[dict | None, str, float]:
    """Boot a guest that runs `python3 -m MODULE ARGS` (which writes OUT/result.json); (result, error, seconds)."""
    from ..testbed import guest
    xfer = out / what
    xfer.mkdir(parents=True, exist_ok=True)
    res_path = xfer / "result.json"
    res_path.unlink(missing_ok=True)
    try:
        res = guest.run([guest.real_python(), "-m", module, *[a.replace("{OUT}", str(res_path)) for a in args]],
                        guest.GuestDevices(smp=smp), timeout=GUEST_TIMEOUT, cwd=REPO, out_dir=xfer, env=GUEST_ENV)
    except guest.GuestError as e:
        return None, f"the guest failed: {e}", 0.0
    if not res_path.exists():
        tail = res.output.strip().splitlines()[-5:]
        return None, f"the guest wrote no result (exit {res.returncode}): " + " / ".join(tail), res.seconds
    return json.loads(res_path.read_text()), "", res.seconds


def _threads(per_thread: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in per_thread.items()) if per_thread else "-"


ETH_FRAME = 1514    # a full-MSS TCP segment on the wire (1448 + 66 bytes of headers)


def usbfs_floor_lines(raw: dict) -> list[str]:
    """The usbfs floor next to what udrv's daemon spent per TX frame in the same boot."""
    fl = raw.get("usbfs_floor")
    if not fl:
        return []
    if "error" in fl:
        return [f"usbfs floor not measured: {fl['error']}", ""]
    floor = fl["us_per_frame_user"] + fl["us_per_frame_sys"]
    line = (f"usbfs floor (submit + reap and nothing else: one thread, 64 bulk OUT transfers of {ETH_FRAME} "
            f"bytes queued, the gadget dropping them early): {fl['frames_per_s']:.0f} frames/s "
            f"({fl['mbit_s']:.0f} Mbit/s), {floor:.1f} µs of CPU per frame ({fl['us_per_frame_user']:.1f} user + "
            f"{fl['us_per_frame_sys']:.1f} system).")
    tx, cpu = raw.get("native", {}).get("tx"), raw.get("native_cpu", {}).get("tx", {})
    if tx and cpu.get("daemon_user") is not None:
        per_frame = (cpu["daemon_user"] + cpu["daemon_sys"]) / (tx * 1e6 / 8 / ETH_FRAME) * 1e6
        line += (f" udrv's daemon during TCP TX: {per_frame:.1f} µs per {ETH_FRAME}-byte frame sent (its CPU over "
                 f"the TX rate; the ACKs it receives are in it too), so usbfs alone is {floor / per_frame:.0%} "
                 "of it; the kernel's cdc_ether pays no system call per frame.")
    return [line, ""]


def _ms(v: float | None) -> str:
    return f"{v:.1f} ms" if v is not None else "-"


def _rtt_medians(by_side: dict[str, list]) -> dict[str, float] | None:
    """The median of each side's measured TCP RTTs (None entries: runs without one); None unless
    every side has one."""
    med = {side: statistics.median(v for v in rtts if v is not None)
           for side, rtts in by_side.items() if any(v is not None for v in rtts)}
    return med if len(med) == len(by_side) else None


def tx_rtt_lines(raw: dict) -> list[str]:
    """The latency under load: the mean RTT the sending TCP measured during TX, median per path
    (and of the C ring under each other AQM setting that ran), and of a ping beside the flow."""
    med = _rtt_medians({name: [r.get("tx_rtt_ms") for r in cdc_runs(raw, name)] for name in ("kernel", "native")})
    if not med:
        return []
    others = [n for n in cdc_variants(raw) if n.startswith(AQM_VARIANT)]
    rtt = _rtt_medians({n: [r.get("tx_rtt_ms") for r in cdc_runs(raw, n)] for n in others}) or {}
    names = ("kernel", "native", *others)
    ping = _rtt_medians({name: [r.get("tx_ping_ms") for r in cdc_runs(raw, name)] for name in names})
    return [f"Latency under load (TX: the mean RTT the sending TCP measured, median of each side's runs): "
            f"{KERNEL_DRIVER['cdc_ecm']} {med['kernel']:.1f} ms, udrv {med['native']:.1f} ms"
            + "".join(f", udrv with UDRV_AQM={n[len(AQM_VARIANT):]} {ms:.1f} ms" for n, ms in rtt.items())
            + (f"; a ping every 100 ms beside the flow: {KERNEL_DRIVER['cdc_ecm']} {ping['kernel']:.1f} ms, udrv "
               f"{ping['native']:.1f} ms"
               + "".join(f", UDRV_AQM={n[len(AQM_VARIANT):]} {ping[n]:.1f} ms" for n in others)
               if ping else "") + ". A TAP gives TCP "
            "no backpressure (tun orphans each frame it queues, so TCP Small Queues do not see it): under "
            "load the frames TCP hands over queue in udrv's TX journal, where CoDel (5 ms target, 100 ms "
            "interval by default; UDRV_AQM=T/I in ms sets others, off turns it off) drops or ECN-marks "
            "those that waited too long; cdc_ether holds "
            "each frame until its URB completes, so TCP keeps its queue short itself.", ""]


def pegasus_rtt_lines(runs: list[dict]) -> list[str]:
    """udrv.bench.pegasus's runs: the median TCP TX RTT of pegasus.ko's runs and of udrv's."""
    med = _rtt_medians({path: [r.get("tcp_rtt_ms") for r in runs if r.get("path") == path]
                        for path in ("pegasus.ko", "udrv")})
    if not med:
        return []
    return [f"Latency under load (TCP TX: the mean RTT the sending TCP measured, median of each side's runs): "
            f"pegasus.ko {med['pegasus.ko']:.1f} ms, udrv {med['udrv']:.1f} ms (udrv's queue is its TX journal: "
            "see the cdc_ecm section).", ""]


def tx_cpu_budget_lines(raw: dict, target: float = 0.9) -> list[str]:
    """The whole guest's CPU per TCP TX frame on each path (iperf3, TCP and the gadget
    included: the same work on both sides but for the driver's own), and what udrv's cost per
    frame would take at `target` of cdc_ether's rate: past the guest's vCPUs, no tuning of the
    daemon gets there, only a cheaper way to the device (usbfs costs two system calls a frame)."""
    def per_frame(name: str) -> tuple[float, float, int] | None:
        run, cpu = raw.get(name), raw.get(f"{name}_cpu", {}).get("tx", {})
        if not isinstance(run, dict) or not run.get("tx") or cpu.get("guest_busy") is None or not cpu.get("vcpus"):
            return None
        fps = run["tx"] * 1e6 / 8 / ETH_FRAME
        return cpu["guest_busy"] * cpu["vcpus"] / fps * 1e6, fps, cpu["vcpus"]
    kernel = [p for p in (per_frame("kernel"), per_frame("kernel_after")) if p]
    mine = per_frame("native")
    if not kernel or not mine:
        return []
    k_us, k_fps = statistics.mean(p[0] for p in kernel), statistics.mean(p[1] for p in kernel)
    u_us, u_fps, vcpus = mine
    need = target * k_fps * u_us / 1e6
    verdict = (f"more than the {vcpus} it has: out of reach for the CPU this guest has" if need > vcpus
               else f"of its {vcpus}")
    return [f"Guest CPU per TCP TX frame (every vCPU's busy time over the {ETH_FRAME}-byte frames sent; iperf3, "
            f"TCP and the gadget are in both): {KERNEL_DRIVER['cdc_ecm']} {k_us:.0f} µs at {k_fps:.0f} frames/s, "
            f"udrv {u_us:.0f} µs at {u_fps:.0f} frames/s. At {target} of {KERNEL_DRIVER['cdc_ecm']}'s rate "
            f"({target * k_fps:.0f} frames/s) udrv's cost per frame would keep {need:.2f} vCPUs busy, {verdict}.",
            ""]


def cdc_ecm_details(raw: dict) -> list[str]:
    details: list[str] = []
    if "native_unavailable" in raw:
        details.append(f"C transfer ring not measured: {raw['native_unavailable']}")
    details += ["iperf3 between the host side (the kernel's cdc_ether netdev, then udrv0, then cdc_ether "
               "again) and the gadget's usb0 in a network namespace; the gadget is the kernel's own f_ecm "
               "(configfs) on dummy_hcd, so the device side costs the same for both drivers. The C ring's "
               "runs alternate with the kernel's (rounds); ratios are of the medians of each side's runs.", ""]
    names = {"kernel": KERNEL_DRIVER["cdc_ecm"], "kernel_after": f"{KERNEL_DRIVER['cdc_ecm']}, again at the end",
             **CDC_VARIANTS, **cdc_variants(raw)}
    runs = [(label, raw[n]) for n, label in names.items() if isinstance(raw.get(n), dict) and "tx" in raw[n]]
    runs[1:1] = [(f"{KERNEL_DRIVER['cdc_ecm']}, round {i + 2}", r) for i, r in enumerate(raw.get("kernel_more", []))]
    for name, label in names.items():
        if name.startswith("native"):
            runs += [(f"{label}, round {i + 2}", r) for i, r in enumerate(raw.get(f"{name}_more", []))]
    if runs:
        details += ["| run | TX Mbit/s | RX Mbit/s | TX: TCP's RTT | TX: a ping beside it (median) |",
                    "|---|---|---|---|---|"]
        details += [f"| {label} | {r['tx']:.1f} | {r['rx']:.1f} | "
                    f"{_ms(r.get('tx_rtt_ms'))} | {_ms(r.get('tx_ping_ms'))} |" for label, r in runs]
        details += ["", *tx_rtt_lines(raw)]
    cpu = [(label, raw[f"{n}_cpu"]) for n, label in names.items() if f"{n}_cpu" in raw]
    if cpu:
        vcpus = next((c["vcpus"] for _, per in cpu for c in per.values() if c.get("vcpus")), None)
        details += ["Where the time goes during each iperf3 run: guest busy = the share of all the guest's "
                    f"{vcpus or ''} vCPUs that was busy (1.0 = every vCPU); udrv's daemon CPU in seconds per wall "
                    "second (1.0 = one vCPU), in all and per thread (`main` = the daemon's loop, "
                    "`udrv-ring-tx` = the C ring's TX half; a thread near 1.0 sets the pace).", "",
                    "| driver | direction | guest busy | daemon user | daemon sys | daemon per thread |",
                    "|---|---|---|---|---|---|"]
        details += [f"| {name} | {way} | {c.get('guest_busy')} | {c.get('daemon_user') if c.get('daemon_user') is not None else '-'} "
                    f"| {c.get('daemon_sys') if c.get('daemon_sys') is not None else '-'} | {_threads(c.get('daemon_threads'))} |"
                    for name, per in cpu for way, c in per.items()]
        details.append("")
    details += tx_cpu_budget_lines(raw)
    details += usbfs_floor_lines(raw)
    if raw.get("recovery"):
        from .sidebyside import recovery_table
        details += ["Recovery latency on the real gadget (C ring): a UDP packet every 1 ms from the host side "
                    "across udrv0 to an echo behind the gadget's usb0; per injected fault the interruption is the "
                    "largest gap between replies (ms). Checkpoint = rollback + device restore + one retry; the "
                    "C ring's transfers stay in flight after a fault of the driver's own, after one the device "
                    "reported (STALL, timeout) its OUT side is recycled and the journal re-issued; full restart = `udrv run --recovery "
                    "restart`: a fresh driver instance, the device opened and configured again, the journal "
                    "re-issued. Both runs keep the C ring "
                    "(`--swap-after 0`: no swap to the Python engine after repeated escalations).", ""]
        details += recovery_table(raw["recovery"])
    return details


def bench_cdc_ecm(out: Path, seconds: float, smp: int) -> DeviceResult:
    d = DeviceResult("cdc_ecm")
    raw, err, d.guest_seconds = _run_tool("udrv.bench.cdc_ecm", ["guest", str(max(1, round(seconds))), "{OUT}",
                                                           f"--rounds={CDC_ROUNDS}"],
                                          out, smp, "cdc_ecm")
    d.raw, d.error = raw or {}, err or (raw or {}).get("error", "")
    d.rows = cdc_ecm_rows(d.raw)
    d.details = cdc_ecm_details(d.raw)
    return d


def bench_pegasus(out: Path, seconds: float, smp: int) -> DeviceResult:
    d = DeviceResult("pegasus")
    raw, err, d.guest_seconds = _run_tool("udrv.bench.pegasus", ["--in-guest", "{OUT}", "--seconds", str(seconds),
                                                           "--udp-pps", str(PEGASUS_UDP_PPS),
                                                           "--rounds", str(PEGASUS_ROUNDS)], out, smp, "pegasus")
    d.raw, d.error = raw or {}, err or (raw or {}).get("error", "")
    d.rows = pegasus_rows(d.raw, PEGASUS_UDP_PPS)
    runs = [r for r in d.raw.get("runs", []) if "error" not in r]
    if runs:
        d.details += ["pegasus.ko and udrv take turns on the same gadget in rounds (pegasus.ko first and last); the "
                      "rows above compare the medians of each side's runs. Where the time goes: CPU seconds per "
                      "wall second (1.0 = one vCPU) of the gadget process (the device side, udrv's pegasus model "
                      "over FunctionFS) and of udrv's daemon; when the gadget sits near one vCPU it, not the "
                      "driver, sets the pace. Guest busy: the share of all the guest's vCPUs that was busy "
                      "(1.0 = every vCPU).", "",
                      "| round | driver | measurement | rate | gadget CPU | udrv CPU | guest busy | TX: TCP's RTT |",
                      "|---|---|---|---|---|---|---|---|"]
        d.details += [f"| {r.get('round', 1)} | {r['path']} | {r['direction']} | {r['mbit_s']} | {r['gadget_cpu']} | "
                      f"{r['udrv_cpu'] if r['udrv_cpu'] is not None else '-'} | {r['guest_busy']} | "
                      f"{_ms(r.get('tcp_rtt_ms'))} |" for r in runs]
        d.details += ["", *pegasus_rtt_lines(runs)]
    return d


RUNNERS = {"e1000": bench_e1000, "cdc_ecm": bench_cdc_ecm, "pegasus": bench_pegasus}


# --- the report ---------------------------------------------------------------------------------------

def _fmt(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def render(results: list[DeviceResult], meta: dict) -> str:
    L = ["# udrv vs the Linux kernel's own drivers, side by side", "",
         f"`udrv bench` on {meta.get('date', '?')}: one QEMU/TCG guest boot per device (Debian kernel "
         f"{meta.get('kernel', '?')}); in each boot the kernel's driver and udrv drive the same device one after "
         f"the other, {meta.get('seconds')} s per iperf3 run. Host: {meta.get('host_cpus')} cores, load average "
         f"{meta.get('load_before')} before / {meta.get('load_after')} after (the host is shared and TCG speed "
         "follows it: absolute numbers move between runs, the ratios of one boot are what this measures).", "",
         "| device | measurement | kernel driver | kernel | udrv datapath | udrv | udrv / kernel | target | |",
         "|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        if not d.rows:
            L.append(f"| {d.device} | - | {KERNEL_DRIVER[d.device]} | - | - | - | - | {TARGET[d.device]} | "
                     f"failed: {d.error or 'no measurement'} |")
        for r in d.rows:
            L.append(f"| {r.device} | {r.measurement} | {KERNEL_DRIVER[r.device]} | {_fmt(r.kernel)} {r.unit} | "
                     f"{r.variant} | {_fmt(r.udrv)} | **{r.ratio:.2f}** | {r.target:g} | {r.verdict} |")
    L.append("")
    for d in results:
        L += [f"## {d.device} vs {KERNEL_DRIVER[d.device]}", ""]
        if d.guest_seconds:
            L += [f"Guest boot: {d.guest_seconds:.0f} s.", ""]
        if d.error:
            L += [f"**Stopped early: {d.error}**", ""]
        L += d.details
    if meta.get("model_recovery"):
        L += ["", "## Recovery latency, every driver on its embedded model (model tier, on the host)", "",
              f"`udrv bench recovery --repeats {meta.get('model_recovery_repeats')}`, run before the guests "
              f"(host load average {meta.get('model_recovery_load')}). Target: p99 < 10 ms for checkpoint "
              "recovery; the control rows show what the host's scheduling alone costs in the same windows.", "",
              meta["model_recovery"]]
    return "\n".join(L) + "\n"


def model_recovery(repeats: int) -> str:
    """`udrv bench recovery` (all embedded drivers) as a child process: its markdown, or why it failed."""
    try:
        cp = subprocess.run([sys.executable, "-m", "udrv.cli", "bench", "recovery", "--repeats", str(repeats),
                             "--ifname", "udrvrec0"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "**failed: udrv bench recovery did not finish in 15 min**"
    if cp.returncode != 0:
        return f"**failed (exit {cp.returncode}):** " + (cp.stderr.strip().splitlines() or ["no output"])[-1]
    return cp.stdout.strip()


def chart(results: list[DeviceResult], path: Path) -> Path:
    """One panel per device: udrv/kernel per measurement and datapath; the kernel is 1.0."""
    panels = []
    for d in results:
        groups = list(dict.fromkeys(r.measurement for r in d.rows))
        variants = list(dict.fromkeys(r.variant for r in d.rows))
        by = {(r.variant, r.measurement): r.ratio for r in d.rows}
        series = [(v, [by.get((v, g), math.nan) for g in groups]) for v in variants]
        if groups:
            panels.append((f"{d.device} (target {TARGET[d.device]:g})", groups, series))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png_bars(path, panels)
        return path
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.4), squeeze=False)
    for ax, (title, groups, series) in zip(axes[0], panels):
        width = 0.8 / max(1, len(series))
        for i, (label, vals) in enumerate(series):
            xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
            vals = [0.0 if v != v else v for v in vals]
            bars = ax.bar(xs, vals, width, label=label, color=[c / 255 for c in COLORS[(i + 2) % len(COLORS)]])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(float(title.split("target ")[1].rstrip(")")), color="red", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)), [g.replace(" -> ", "\n-> ") for g in groups], fontsize=7)
        ax.set_ylabel("udrv / kernel")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("udrv / the kernel's own driver, same device, same guest boot (QEMU/TCG)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: list[DeviceResult], meta: dict, out: Path) -> str:
    report = render(results, meta)
    (out / "report.md").write_text(report)
    chart(results, out / "sidebyside.png")
    raw = {"meta": meta, "devices": {d.device: {**asdict(d), "rows": [{**asdict(r), "ratio": r.ratio}
                                                                       for r in d.rows]} for d in results}}
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    return report


def run_all(out: Path, seconds: float = 5.0, only: tuple[str, ...] = DEVICES, smp: int | None = None,
            recovery_repeats: int = 0) -> int:
    unknown = [d for d in only if d not in RUNNERS]
    if unknown:
        raise UdrvError(f"unknown device {unknown[0]!r} for udrv bench: choose from {', '.join(DEVICES)}")
    if os.geteuid() != 0:
        raise UdrvError("udrv bench boots QEMU guests with TAPs and network namespaces: run it as root")
    for tool, package in (("iperf3", "iperf3"), ("ip", "iproute2")):
        if not shutil.which(tool):
            raise UdrvError(f"{tool} is not installed on the host: apt-get install {package}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": seconds, "host_cpus": os.cpu_count(),
            "load_before": round(os.getloadavg()[0], 2)}
    if recovery_repeats:
        print("udrv bench: recovery latency on the embedded models (host, ~2 min)", file=sys.stderr)
        meta["model_recovery_load"] = round(os.getloadavg()[0], 2)
        meta["model_recovery_repeats"] = recovery_repeats
        meta["model_recovery"] = model_recovery(recovery_repeats)
    results = []
    for dev in only:
        print(f"udrv bench: {dev} vs {KERNEL_DRIVER[dev]} (one guest boot, a few minutes)", file=sys.stderr)
        try:
            results.append(RUNNERS[dev](out, seconds, smp or DEFAULT_SMP[dev]))
        except UdrvError as e:
            results.append(DeviceResult(dev, error=str(e)))
        r = results[-1]
        print(f"udrv bench: {dev}: " + (", ".join(f"{x.measurement} ({x.variant}) {x.ratio:.2f}" for x in r.rows)
                                         or f"failed: {r.error}"), file=sys.stderr)
    meta["load_after"] = round(os.getloadavg()[0], 2)
    try:
        from ..testbed import guest
        meta["kernel"] = guest.prepare().kver             # cached: the kernel every boot above used
    except Exception as e:                                 # the report still renders
        meta["kernel"] = f"? ({e})"
    report = write_outputs(results, meta, out)
    print(report)
    print(f"written: {out / 'report.md'}, {out / 'sidebyside.png'}, {out / 'results.json'}")
    return 0 if all(d.rows and not d.error for d in results) else 1
