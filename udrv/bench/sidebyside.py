"""udrv's e1000 next to the kernel's e1000 driver, on the same QEMU device, in one guest boot.

    udrv bench e1000 [--out DIR] [--seconds S] [--bench-rounds N] [--model e1000|e1000e]
                     [--repeats N] [--fault ENTRY:KIND ...] [--smp 1] [--no-python-ring] [--no-profile]

What runs where:
  host (this process, root)   HostPeer: a TAP for QEMU's NIC, moved into a network namespace of
                              its own as soon as QEMU holds it, with `iperf3 -s` and a UDP echo
                              there (so no 10.x address ever exists outside that namespace);
                              boots the kernel-tier guest (udrv.testbed.guest) and writes report.md,
                              results.json and throughput.png into --out.
  guest (`python3 -m udrv.bench.sidebyside guest CONFIG OUT`)
                              1. kernel: modprobe e1000/e1000e, the kernel's netdev gets GUEST_IP,
                                 iperf3 TCP both ways + 64-byte UDP both ways;
                              2. `udrv bind` (kernel driver -> vfio-pci), then udrv's daemon with the
                                 C ring: the same four measurements, the daemon's CPU split
                                 (user/sys from /proc/<pid>/stat) and per-frame CPU cost, and a
                                 py-spy profile in a separate pass when udrv is slower;
                              3. the Python ring (E1000 alone), the same;
                              4. recovery latency: a 1 ms UDP probe to the peer's echo, faults
                                 injected through the control socket, the largest reply gap per
                                 fault; checkpoint recovery vs full restart;
                              5. `udrv unbind`: the device goes back to the kernel driver, whose
                                 four measurements are taken again (the host is shared: the
                                 kernel runs bracket udrv's, ratios use their mean).
  re-render: `python3 -m udrv.bench.sidebyside report OUT/results.json OUT`

Every udrv daemon here is `udrv run pci:BDF [--impl c|python] --recovery checkpoint|restart`
(GuestDaemon): the daemon users run, its implementation and recovery mode chosen by its own options.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .recovery import percentile, shorter_above_floor
from ..errors import UdrvError

REPO = Path(__file__).resolve().parents[2]
ECHO_PORT = 7777
IPERF_PORT = 5201
FAULTS = ("xmit:raise", "poll:stall", "set_rx_mode:raise", "link_check:hang")
MODEL_IDS = {"e1000": "8086:100e", "e1000e": "8086:10d3"}
KERNEL_DRIVER = {"e1000": "e1000", "e1000e": "e1000e"}

# every interpreter in the guest would otherwise compile udrv from source again (seconds under TCG);
# the .pyc files land in the guest's tmpfs overlay, never on the host
# under TCG one turn of a supervised worker's loop can take longer than the host's 12 ms heartbeat
GUEST_ENV = {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "", "UDRV_HEARTBEAT_TIMEOUT_MS": "300"}

# timeouts (seconds)
CMD_TIMEOUT = 60.0
QEMU_ATTACH_TIMEOUT = 30.0       # QEMU opens the TAP within a second of starting
DAEMON_UP_TIMEOUT = 90.0         # interpreter start + VFIO open + probe under TCG: ~10 s
SPARE_READY_TIMEOUT = 180.0      # a warm spare's interpreter start-up and imports under TCG
DAEMON_STOP_TIMEOUT = 30.0
PEER_READY_TIMEOUT = 60.0        # guest side: the peer's echo must answer within this


# =============================================================================================
# small helpers (both sides)
# =============================================================================================

def sh(*cmd: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    try:
        cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UdrvError(f"{cmd[0]} is not installed: apt-get install "
                        f"{ {'ip': 'iproute2', 'iperf3': 'iperf3'}.get(cmd[0], cmd[0]) }") from None
    except subprocess.TimeoutExpired:
        raise UdrvError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
    if check and cp.returncode != 0:
        raise UdrvError(f"`{' '.join(cmd)}` failed: {(cp.stderr or cp.stdout).strip()}")
    return cp.stdout


def steady_state(status: Callable[[], dict], timeout: float = SPARE_READY_TIMEOUT) -> int:
    """Wait, under a supervisor, until the warm spare is ready: its start-up (an interpreter
    importing everything, seconds of a vCPU under TCG) must not land in a measurement of the
    datapath. Returns the pid that runs the driver (the worker; 0 in one process)."""
    def ready() -> bool:
        st = status()
        return "supervisor" not in st or bool(st.get("spare") and st["spare"]["state"] == "idle")
    wait_for(ready, timeout, "the warm spare to be ready", 0.5)
    return int((status().get("worker") or {}).get("pid") or 0)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:       # the thing waited for may not exist yet
            last = e
        time.sleep(interval)
    raise UdrvError(f"timed out after {timeout:.0f} s waiting for {what}"
                    + (f" (last error: {last})" if last else ""))


# =============================================================================================
# host side: the peer
# =============================================================================================

@dataclass(frozen=True)
class PeerPlan:
    """Names and addresses of one peer. The TAP lives in `netns` once QEMU holds it."""
    tap: str = "udrvsbs0"
    netns: str = "udrvsbs"
    host_ip: str = "10.79.7.1"
    guest_ip: str = "10.79.7.2"
    prefix: int = 24

    @classmethod
    def unique(cls, tag: str) -> "PeerPlan":
        """A peer no other run on this machine uses (tag: a few letters; the pid is added)."""
        n = os.getpid() % 200 + 20
        t = f"{tag[:4]}{os.getpid() % 100000}"
        return cls(tap=f"u{t}"[:15], netns=f"udrv-{t}", host_ip=f"10.79.{n}.1", guest_ip=f"10.79.{n}.2")


@dataclass
class PeerCounters:
    rx_packets: int = 0      # frames the peer received (sent by the guest)
    tx_packets: int = 0      # frames the peer sent (to the guest)
    rx_bytes: int = 0
    tx_bytes: int = 0


class HostPeer:
    """The host end of QEMU's `-netdev tap`: created persistent in the root namespace (the
    harness leaves an existing TAP alone), moved into its own namespace once QEMU attached
    (carrier on), then addressed, with a UDP echo and an iperf3 server started there. Deleting
    the namespace deletes the TAP."""

    def __init__(self, plan: PeerPlan, iperf: bool = True):
        if os.geteuid() != 0:
            raise UdrvError("the host peer (a TAP in a network namespace) needs root: run with sudo")
        self.plan = plan
        self.iperf = iperf
        self.ready = threading.Event()
        self.error = ""
        self._procs: list[subprocess.Popen] = []
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def __enter__(self) -> "HostPeer":
        p = self.plan
        sh("ip", "netns", "del", p.netns, check=False)
        if Path(f"/sys/class/net/{p.tap}").exists():
            sh("ip", "link", "del", p.tap, check=False)
        sh("ip", "netns", "add", p.netns)
        sh("ip", "tuntap", "add", "dev", p.tap, "mode", "tap")
        sh("ip", "link", "set", p.tap, "up")
        self._thread = threading.Thread(target=self._adopt, name="host-peer", daemon=True)
        self._thread.start()
        return self

    def _adopt(self) -> None:
        p = self.plan
        try:
            carrier = Path(f"/sys/class/net/{p.tap}/carrier")
            end = time.monotonic() + QEMU_ATTACH_TIMEOUT
            while not self._closed.is_set():
                try:
                    if carrier.read_text().strip() == "1":
                        break
                except OSError:
                    pass
                if time.monotonic() > end:
                    raise UdrvError(f"QEMU did not attach to TAP {p.tap} within {QEMU_ATTACH_TIMEOUT:.0f} s")
                time.sleep(0.02)
            else:
                return
            sh("ip", "link", "set", p.tap, "netns", p.netns)
            sh("ip", "-n", p.netns, "link", "set", "lo", "up")
            sh("ip", "-n", p.netns, "addr", "add", f"{p.host_ip}/{p.prefix}", "dev", p.tap)
            sh("ip", "-n", p.netns, "link", "set", p.tap, "up")
            exe = ["ip", "netns", "exec", p.netns]
            self._procs.append(subprocess.Popen(exe + [sys.executable, "-m", "udrv.bench.echo", "--port", str(ECHO_PORT)],
                                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if self.iperf:
                if not shutil.which("iperf3"):
                    raise UdrvError("iperf3 is not installed on the host: apt-get install iperf3")
                self._procs.append(subprocess.Popen(exe + ["iperf3", "-s", "-B", p.host_ip, "-p", str(IPERF_PORT)],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ready.set()
        except Exception as e:
            self.error = str(e)

    def counters(self) -> PeerCounters:
        """The TAP's own counters (its rx = what the guest sent)."""
        out = sh("ip", "-n", self.plan.netns, "-s", "-j", "link", "show", self.plan.tap)
        st = json.loads(out)[0]["stats64"]
        return PeerCounters(st["rx"]["packets"], st["tx"]["packets"], st["rx"]["bytes"], st["tx"]["bytes"])

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._thread is not None:
            self._thread.join(5)
        sh("ip", "netns", "del", self.plan.netns, check=False)       # takes the TAP with it
        if Path(f"/sys/class/net/{self.plan.tap}").exists():          # never moved (QEMU failed)
            sh("ip", "link", "del", self.plan.tap, check=False)


# =============================================================================================
# guest side
# =============================================================================================

@dataclass
class GuestConfig:
    model: str = "e1000"
    host_ip: str = PeerPlan.host_ip
    guest_ip: str = PeerPlan.guest_ip
    prefix: int = 24
    seconds: float = 5.0             # per iperf3 measurement
    rounds: int = 1                  # measurements per case (median reported)
    python_ring: bool = True
    no_coalesce: bool = False        # also the C ring with RX coalescing off (UDRV_RX_COALESCE=0)
    profile: bool = True             # py-spy pass when udrv is slower than the kernel
    repeats: int = 5                 # injections per fault type and recovery mode
    faults: tuple[str, ...] = FAULTS
    ifname: str = "udrv0"


@dataclass
class CpuSample:
    """Guest-wide CPU time (s) by kind, and one process's user/sys time (s)."""
    at: float
    cpu: dict[str, float]
    proc: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def take(cls, pid: int | None = None) -> "CpuSample":
        tick = os.sysconf("SC_CLK_TCK")
        names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:1 + len(names)]
        cpu = {n: int(v) / tick for n, v in zip(names, first)}
        proc = (0.0, 0.0)
        if pid is not None:
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                proc = (int(f[11]) / tick, int(f[12]) / tick)      # utime, stime (fields 14, 15)
            except (OSError, IndexError):
                pass
        return cls(time.monotonic(), cpu, proc)

    def since(self, old: "CpuSample") -> dict[str, float]:
        d = {k: self.cpu[k] - old.cpu[k] for k in self.cpu}
        total = sum(d.values()) or 1e-9
        out = {f"{k}_pct": round(100 * v / total, 1) for k, v in d.items() if k in ("user", "system", "softirq", "idle", "irq")}
        out["busy_pct"] = round(100 * (1 - d["idle"] / total), 1)
        out["busy_s"] = round(total - d["idle"] - d["iowait"], 3)
        out["daemon_user_s"] = round(self.proc[0] - old.proc[0], 3)
        out["daemon_sys_s"] = round(self.proc[1] - old.proc[1], 3)
        out["wall_s"] = round(self.at - old.at, 3)
        return out


def netdev_frames(ifname: str) -> int:
    base = Path(f"/sys/class/net/{ifname}/statistics")
    return int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text())


MEASUREMENTS: dict[str, tuple[list[str], str]] = {
    # name: (iperf3 options, unit)
    "tcp_tx": (["-O", "1"], "Mbit/s"),
    "tcp_rx": (["-O", "1", "-R"], "Mbit/s"),
    "udp64_tx": (["-u", "-l", "64", "-b", "0"], "kpps"),
    "udp64_rx": (["-u", "-l", "64", "-b", "0", "-R"], "kpps"),
}


def iperf3(host: str, opts: list[str], seconds: float) -> dict:
    t = max(1, round(seconds))
    out = sh("iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(t), "-J", *opts, check=False,
             timeout=t + 40)
    try:
        data = json.loads(out)
    except ValueError:
        raise UdrvError(f"iperf3 {' '.join(opts)} printed no JSON: {out[-300:]!r}") from None
    if "error" in data:
        raise UdrvError(f"iperf3 {' '.join(opts)} failed: {data['error']}")
    return data


def tcp_sender_rtt_ms(data: dict) -> float | None:
    """The mean RTT the sending TCP measured (iperf3 reports it, in µs, when this side sends):
    the queue in front of the device under load."""
    rtts = [st["sender"].get("mean_rtt") for st in data["end"].get("streams", []) if "sender" in st]
    return round(rtts[0] / 1000, 2) if rtts and rtts[0] else None


def iperf_value(data: dict, unit: str) -> float:
    r = data["end"]["sum_received"]
    if unit == "Mbit/s":
        return r["bits_per_second"] / 1e6
    return (r["packets"] - r["lost_packets"]) / max(r["seconds"], 1e-9) / 1e3


def measure(cfg: GuestConfig, name: str, ifname: str, pid: int | None) -> dict:
    opts, unit = MEASUREMENTS[name]
    values, cpus = [], []
    for _ in range(cfg.rounds):
        f0, c0 = netdev_frames(ifname), CpuSample.take(pid)
        data = iperf3(cfg.host_ip, opts, cfg.seconds)
        c1, f1 = CpuSample.take(pid), netdev_frames(ifname)
        cpu = c1.since(c0)
        frames = f1 - f0
        cpu["frames"] = frames
        cpu["guest_us_per_frame"] = round(cpu["busy_s"] / max(frames, 1) * 1e6, 2)
        if pid is not None:
            cpu["daemon_us_per_frame"] = round((cpu["daemon_user_s"] + cpu["daemon_sys_s"]) / max(frames, 1) * 1e6, 2)
        cpu["iperf3_cpu_pct"] = round(data["end"].get("cpu_utilization_percent", {}).get("host_total", 0.0), 1)
        rtt = tcp_sender_rtt_ms(data) if name == "tcp_tx" else None
        if rtt is not None:
            cpu["tcp_rtt_ms"] = rtt
        values.append(iperf_value(data, unit))
        cpus.append(cpu)
    k = values.index(sorted(values)[len(values) // 2])
    return {"value": round(values[k], 2), "unit": unit, "all": [round(v, 2) for v in values], "cpu": cpus[k]}


def echo_once(dst: str, port: int = ECHO_PORT, timeout: float = 0.5) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"udrv-sidebyside", (dst, port))
        return s.recv(64) == b"udrv-sidebyside"
    except OSError:
        return False
    finally:
        s.close()


def configure_ip(cfg: GuestConfig, ifname: str) -> None:
    sh("ip", "addr", "replace", f"{cfg.guest_ip}/{cfg.prefix}", "dev", ifname)
    sh("ip", "link", "set", ifname, "up")
    wait_for(lambda: echo_once(cfg.host_ip), PEER_READY_TIMEOUT,
             f"the peer's UDP echo at {cfg.host_ip}:{ECHO_PORT} to answer through {ifname}", 0.0)


def find_bdf(vendor_device: str) -> str:
    ven, dev = (int(x, 16) for x in vendor_device.split(":"))
    for d in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if int((d / "vendor").read_text(), 16) == ven and int((d / "device").read_text(), 16) == dev:
            return d.name
    raise UdrvError(f"no PCI device {vendor_device} in the guest: boot it with GuestDevices({vendor_device})")


def kernel_netdev(bdf: str) -> str | None:
    d = Path(f"/sys/bus/pci/devices/{bdf}/net")
    names = sorted(os.listdir(d)) if d.is_dir() else []
    return names[0] if names else None


def udrv_cli(*args: str) -> str:
    return sh(sys.executable, "-m", "udrv.cli", *args, timeout=120)


# this bench's names for a daemon's implementations -> `udrv run`'s --impl (None: as users run it,
# the C ring first with the Python ring as its spare)
RUN_IMPL = {"c": None, "c-only": "c", "python": "python"}
CASE_ENV = {"c-nocoalesce": {"UDRV_RX_COALESCE": "0"}, "c-inproc": {"UDRV_ISOLATION": "0"}}
CASE_SUFFIX = {"c-nocoalesce": ", RX coalescing off", "c-inproc": ", in one process (no supervisor)"}


class GuestDaemon:
    """`udrv run pci:BDF` in a child process, with one of RUN_IMPL and a recovery mode."""

    def __init__(self, bdf: str, ifname: str, impl: str, recovery: str, log: Path, duration: float = 1800,
                 env: dict[str, str] | None = None):
        self.ifname, self.impl, self.recovery, self.log = ifname, impl, recovery, log
        run_impl = RUN_IMPL[impl]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "udrv.cli", "run", f"pci:{bdf}", "--ifname", ifname,
             *(["--impl", run_impl] if run_impl else []), "--recovery", recovery, "--duration", str(duration)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
        self.startup_s = 0.0

    def wait_up(self) -> "GuestDaemon":
        from ..control import control_path
        t0 = time.monotonic()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise UdrvError(f"the udrv daemon exited with {self.proc.returncode}: "
                                f"{self.log.read_text()[-1500:]}")
            return os.path.exists(control_path(self.ifname)) and self.status()["state"] == "up"
        try:
            wait_for(up, DAEMON_UP_TIMEOUT, f"the udrv daemon ({self.impl}, {self.recovery}) to come up", 0.2)
        except UdrvError as e:
            if self.proc.poll() is not None:
                raise UdrvError(f"the udrv daemon exited with {self.proc.returncode}: "
                                f"{self.log.read_text()[-1500:]}") from None
            raise e
        self.startup_s = round(time.monotonic() - t0, 1)
        self.driver_pid = steady_state(self.status) or self.proc.pid
        return self

    @property
    def pid(self) -> int:
        """The process that runs the driver: the worker under a supervisor (its CPU is what the
        datapath costs; the supervisor sleeps in select)."""
        return getattr(self, "driver_pid", self.proc.pid)

    def status(self) -> dict:
        from ..control import request
        r = request(self.ifname, {"cmd": "status"}, timeout=10.0)
        if not r.get("ok"):
            raise UdrvError(f"udrv status: {r.get('error')}")
        return r["status"]

    def inject(self, entry: str, kind: str) -> None:
        from ..control import request
        r = request(self.ifname, {"cmd": "inject", "entry": entry, "kind": kind, "count": 1}, timeout=10.0)
        if not r.get("ok"):
            raise UdrvError(f"udrv inject {entry} {kind}: {r.get('error')}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


IMPL_LABELS = {"E1000Native": "udrv C ring (E1000Native)", "E1000": "udrv Python ring (E1000)"}


# --- profile --------------------------------------------------------------------------------------

def pyspy_profile(pid: int, seconds: float, run: Callable[[], Any], out: Path) -> dict:
    """py-spy samples the daemon (busy samples only) while `run` generates traffic; returns the
    functions with the most self time and the largest inclusive shares."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy is not installed (pip install 'udrv[bench]'); only the CPU split is reported"}
    rec = subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                            "--rate", "100", "--format", "raw", "--nonblocking", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    try:
        run()
    finally:
        try:
            _, err = rec.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            rec.kill()
            _, err = rec.communicate()
    if not out.exists():
        return {"error": f"py-spy recorded nothing: {err.strip()[-300:]}"}
    return summarize_collapsed(out.read_text())


def _frame_name(frame: str) -> str:
    """'poll (udrv/daemon.py:123)' -> 'poll (daemon.py)'."""
    if " (" in frame and frame.endswith(")"):
        fn, loc = frame[:-1].split(" (", 1)
        return f"{fn} ({os.path.basename(loc.rsplit(':', 1)[0])})"
    return frame


# Where a busy sample's innermost Python frame is, by what that code does per frame. A C call is
# charged to the Python line that made it (py-spy without --native): the C ring's RX harvest
# includes its write()s to the TAP, inside which the guest kernel's network stack runs.
PROFILE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("C ring calls (TX fill/reclaim; RX harvest + write() of each frame to the TAP, where the guest's "
     "network stack runs)", ("PciNativeRing.",)),
    ("Python ring, per frame (descriptors, TAP writes, journal reads)",
     ("PciRing.", "Tap.write", "TxJournal.frame", "TxJournal.take_unsent", "TxJournal.confirm")),
    ("TX frames through Python (TAP read, journal append)",
     ("Tap.read_batch", "TxJournal.append", "TxJournal._set", "TxJournal._get", "TxJournal.space", "Nic.enqueue",
      "Nic._enqueue")),
    ("MMIO (each access traps to QEMU; a TDT write runs QEMU's TX emulation)",
     ("VfioTransport.read32", "VfioTransport.write32")),
    ("daemon loop, guards, timers", ("Daemon.", "Guard.", "Nic.", "Watchdog.", "Condition.wait", "Event.wait",
                                     "Tap.multicast", "Tap.host_config")),
)


def categorize(frame: str) -> str:
    for label, prefixes in PROFILE_CATEGORIES:
        if frame.startswith(prefixes):
            return label
    return "other"


def summarize_collapsed(text: str, top: int = 12) -> dict:
    self_t: dict[str, int] = {}
    cats: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        cat = categorize(frames[-1])
        cats[cat] = cats.get(cat, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def rank(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self": rank(self_t) if total else [], "inclusive": rank(incl) if total else [],
            "categories": rank(cats) if total else []}


def catches_signal(pid: int, signum: int) -> bool:
    """Whether process pid has a handler for signum (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


# --- recovery latency -----------------------------------------------------------------------------

PROMISC_CONTROL = "promisc-toggle:none"   # `ip link set promisc` with no fault: RCTL's own cost
IDLE_CONTROL = "idle:none"                 # the same windows with nothing done: the guest's own jitter


def spacing_for(mode: str, entry: str) -> float:
    """Seconds between injections, so that one injection's interruption never runs into the next:
    link_check runs once a second and its hang lasts its 0.25 s deadline; every RCTL write (a
    promiscuous toggle; every full restart re-programs RCTL) makes QEMU's e1000 refuse RX for
    1 s (its flush_queue_timer)."""
    if entry == "link_check":
        return 2.6 if mode == "restart" else 1.6
    if entry == "idle":
        return 0.7
    if mode == "restart" or entry in ("set_rx_mode", "promisc-toggle"):
        return 1.6
    return 0.7


def recovery_run(cfg: GuestConfig, daemon: GuestDaemon) -> dict:
    """The 1 ms probe across udrv0 while each fault is injected `repeats` times (and, as a
    control, the promiscuous toggle that drives set_rx_mode, without a fault)."""
    from .probe import GapProbe
    mode = daemon.recovery
    plan = list(cfg.faults)
    if any(f.startswith("set_rx_mode:") for f in plan):
        plan.insert(0, PROMISC_CONTROL)
    plan.insert(0, IDLE_CONTROL)
    probe = GapProbe(cfg.host_ip, ECHO_PORT, interval=0.001).start()
    marks: list[tuple[str, float, float]] = []
    per_fault: dict[str, dict[str, list]] = {}
    try:
        # GapProbe.received_so_far() signals the probe with SIGUSR1, whose default action kills it:
        # under TCG the probe's interpreter needs a second or two before its handler exists
        pid = probe._proc.pid if probe._proc else 0
        wait_for(lambda: catches_signal(pid, signal.SIGUSR1), 30, "the probe process to install its handlers")
        wait_for(lambda: probe.received_so_far() > 50, 30, "the 1 ms probe's first replies", 0.2)
        base0 = time.monotonic()
        time.sleep(1.5)
        base = (base0, time.monotonic())
        promisc = False
        for f in plan:
            entry, kind = f.split(":")
            spacing = spacing_for(mode, entry)
            for _ in range(cfg.repeats):
                if kind != "none":
                    daemon.inject(entry, kind)
                t = time.monotonic()
                if entry in ("set_rx_mode", "promisc-toggle"):   # the daemon mirrors the flags within 0.25 s
                    promisc = not promisc
                    sh("ip", "link", "set", cfg.ifname, "promisc", "on" if promisc else "off")
                marks.append((f, t, spacing))
                time.sleep(spacing)
            if kind != "none":
                recs = [r for r in daemon.status()["recent_recoveries"] if r["entry"] == entry][-cfg.repeats:]
                per_fault[f] = {"recovery_ms": [round(r["recovery_ms"], 2) for r in recs],
                                # the daemon's own clock, no probe jitter: rollback + restore (+ restart)
                                "daemon_ms": [round(r["recovery_ms"] + (r.get("restart_ms") or 0.0), 2) for r in recs],
                                "restore_ms": [round(r.get("restore_ms", 0.0), 2) for r in recs],
                                "datapath_ms": [round(r.get("datapath_ms", 0.0), 2) for r in recs],
                                "silent_ms": [round(r["silent_ms"], 2) for r in recs if r["silent_ms"] is not None],
                                "outcomes": sorted({r["outcome"] for r in recs})}
        time.sleep(0.3)
    finally:
        res = probe.stop()
    st = daemon.status()
    gaps: dict[str, list[float]] = {}
    for f, t, spacing in marks:
        gaps.setdefault(f, []).append(round(probe.max_gap_ms(t, t + spacing * 0.9), 2))
    return {
        "mode": mode, "impl": daemon.impl, "sent": res.sent, "received": res.received,
        "duplicates": res.duplicates,
        "baseline_gap_ms": round(probe.max_gap_ms(*base), 2), "gaps_ms": gaps, "per_fault": per_fault,
        "spacing_s": {f: spacing_for(mode, f.split(":")[0]) for f in plan},
        "recoveries": st["recoveries"], "escalations": st["escalations"], "restarts": st["restarts"],
        "swaps": st.get("swaps", 0), "implementation": st.get("implementation"), "ifindex": st["ifindex"],
    }


# --- the guest scenario ---------------------------------------------------------------------------

def dmar_faults() -> list[str]:
    out = sh("dmesg", check=False)
    return [line for line in out.splitlines() if "DMAR" in line and "fault" in line.lower()]


def guest_main(cfg: GuestConfig, out: Path) -> int:
    logs = out.parent
    report: dict[str, Any] = {"stage": "setup", "config": asdict(cfg), "cases": {}, "recovery": [],
                              "kernel_release": os.uname().release, "cpus": os.cpu_count()}

    def save() -> None:
        out.write_text(json.dumps(report, indent=1))

    try:
        kdrv = KERNEL_DRIVER[cfg.model]
        for mod in ("tun", "vfio-pci", kdrv):
            sh("modprobe", mod)
        bdf = find_bdf(MODEL_IDS[cfg.model])
        report["bdf"] = bdf
        netdev = wait_for(lambda: kernel_netdev(bdf), 20, f"the kernel's {kdrv} to register a netdev for {bdf}")
        report["stage"] = "kernel"
        configure_ip(cfg, netdev)
        report["cases"]["kernel"] = {name: measure(cfg, name, netdev, None) for name in MEASUREMENTS}
        report["cases"]["kernel"]["_label"] = f"kernel {kdrv}"
        save()

        report["stage"] = "bind"
        report["bind"] = udrv_cli("bind", bdf).strip()
        # c-inproc: the same C ring without the supervisor, worker and spare (what isolation costs)
        impls = ["c", "c-inproc"] + (["c-nocoalesce"] if cfg.no_coalesce else []) + \
            (["python"] if cfg.python_ring else [])
        for impl in impls:
            report["stage"] = f"udrv {impl}"
            env = CASE_ENV.get(impl)
            d = GuestDaemon(bdf, cfg.ifname, impl.split("-")[0], "checkpoint", logs / f"udrv-{impl}.log",
                            env=env).wait_up()
            try:
                configure_ip(cfg, cfg.ifname)
                case: dict[str, Any] = {name: measure(cfg, name, cfg.ifname, d.pid) for name in MEASUREMENTS}
                st = d.status()
                case["_label"] = IMPL_LABELS.get(st["implementation"], f"udrv {st['implementation']}")
                if impl in CASE_SUFFIX:
                    case["_label"] += CASE_SUFFIX[impl]
                case["_startup_s"] = d.startup_s
                case["_status"] = {k: st[k] for k in ("implementation", "recoveries", "escalations", "tx_dropped",
                                                     "rx_dropped", "rx_missed", "tx_journal")}
                case["_status"]["rx_coalesce"] = st.get("rx_coalesce")   # the whole run's counts
                report["cases"][f"udrv_{impl}"] = case
                save()
                kernel = report["cases"]["kernel"]
                slower = [n for n in ("tcp_tx", "tcp_rx") if case[n]["value"] < kernel[n]["value"]]
                if cfg.profile and slower and not env:
                    report["stage"] = f"profile {impl}"
                    prof = {}
                    for n in slower:
                        prof[n] = pyspy_profile(d.pid, cfg.seconds,
                                                lambda n=n: iperf3(cfg.host_ip, MEASUREMENTS[n][0], cfg.seconds),
                                                logs / f"pyspy-{impl}-{n}.txt")
                    case["_profile"] = prof
                    save()
            finally:
                d.stop()

        for mode in ("checkpoint", "restart"):
            report["stage"] = f"recovery {mode}"
            d = GuestDaemon(bdf, cfg.ifname, "c-only" if impls[0] == "c" else "python", mode,
                            logs / f"udrv-recovery-{mode}.log").wait_up()
            try:
                configure_ip(cfg, cfg.ifname)
                report["recovery"].append(recovery_run(cfg, d))
            finally:
                d.stop()
            save()

        report["stage"] = "unbind"
        report["unbind"] = udrv_cli("unbind", bdf).strip()
        netdev = wait_for(lambda: kernel_netdev(bdf), 20, f"{kdrv} to take {bdf} back")
        report["netdev_back"] = netdev
        report["stage"] = "kernel again"          # drift check: the kernel's numbers after udrv's
        configure_ip(cfg, netdev)
        report["cases"]["kernel_after"] = {name: measure(cfg, name, netdev, None) for name in MEASUREMENTS}
        report["cases"]["kernel_after"]["_label"] = f"kernel {kdrv}, again at the end"
        report["dmar_faults"] = dmar_faults()
        report["stage"] = "done"
        return 0
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["dmar_faults"] = dmar_faults()
        return 1
    finally:
        save()


# =============================================================================================
# host side: the bench
# =============================================================================================

@dataclass
class BenchOptions:
    out: Path = Path("bench-out")
    model: str = "e1000"
    seconds: float = 5.0
    rounds: int = 1
    python_ring: bool = True
    no_coalesce: bool = False
    profile: bool = True
    repeats: int = 10
    faults: tuple[str, ...] = FAULTS
    smp: int = 1
    timeout: float = 1800.0


def run_bench(opts: BenchOptions) -> int:
    if opts.model not in MODEL_IDS:
        raise UdrvError(f"unknown model {opts.model!r}: use e1000 or e1000e")
    if os.geteuid() != 0:
        raise UdrvError("udrv bench e1000 creates a TAP and a network namespace: run it as root")
    for tool, package in (("iperf3", "iperf3"), ("ip", "iproute2")):
        if not shutil.which(tool):
            raise UdrvError(f"{tool} is not installed on the host: apt-get install {package}")
    from ..testbed import guest
    out = opts.out.resolve()
    xfer = out / "guest"
    xfer.mkdir(parents=True, exist_ok=True)
    plan = PeerPlan.unique("sbs")
    cfg = GuestConfig(model=opts.model, host_ip=plan.host_ip, guest_ip=plan.guest_ip, prefix=plan.prefix,
                      seconds=opts.seconds, rounds=opts.rounds, python_ring=opts.python_ring,
                      no_coalesce=opts.no_coalesce, profile=opts.profile,
                      repeats=opts.repeats, faults=tuple(opts.faults))
    cfg_path, res_path = xfer / "config.json", xfer / "result.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))
    res_path.unlink(missing_ok=True)
    print(f"udrv bench e1000: booting the guest ({opts.model}, {opts.smp} vCPU, TCG); this takes a few minutes",
          file=sys.stderr)
    devices = guest.GuestDevices(tap_ifname=plan.tap, smp=opts.smp, **{opts.model: True})
    load_before = os.getloadavg()[0]
    with HostPeer(plan) as peer:
        try:
            res = guest.run([guest.real_python(), "-m", "udrv.bench.sidebyside", "guest", str(cfg_path), str(res_path)],
                            devices, timeout=opts.timeout, env=GUEST_ENV, cwd=REPO, out_dir=xfer)
        except guest.GuestError as e:
            raise UdrvError(f"the guest failed: {e}") from None
        peer_counters = asdict(peer.counters()) if peer.ready.is_set() else None
        if peer.error:
            raise UdrvError(f"the host peer failed: {peer.error}")
    if not res_path.exists():
        raise UdrvError(f"the guest wrote no result (exit {res.returncode}); its output:\n{res.output[-3000:]}")
    result = json.loads(res_path.read_text())
    result["host"] = {"guest_seconds": round(res.seconds, 1), "guest_exit": res.returncode, "smp": opts.smp,
                      "peer_counters": peer_counters, "qemu": _qemu_version(), "host_cpus": os.cpu_count(),
                      "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    report = render_report(result)
    (out / "report.md").write_text(report)
    chart = write_chart(result, out / "throughput.png")
    print(report)
    print(f"\nwritten: {out / 'report.md'}, {out / 'results.json'}, {chart}")
    if "error" in result:
        print(f"udrv bench e1000: the guest stopped at stage {result.get('stage')!r}: {result['error']}",
              file=sys.stderr)
        return 1
    return 0


def _qemu_version() -> str:
    try:
        return sh("qemu-system-x86_64", "--version", timeout=10).splitlines()[0]
    except UdrvError:
        return "?"


# --- the report -----------------------------------------------------------------------------------

LABELS = {"tcp_tx": "TCP guest -> peer (Mbit/s)", "tcp_rx": "TCP peer -> guest (Mbit/s)",
          "udp64_tx": "UDP 64 B guest -> peer (kpps received)", "udp64_rx": "UDP 64 B peer -> guest (kpps received)"}


KERNEL_CASES = ("kernel", "kernel_after")


def kernel_reference(result: dict) -> dict[str, float]:
    """The kernel's value per measurement: the mean of the runs before and after udrv's (the
    host is shared; bracketing udrv's runs evens out drift), or the one that exists."""
    cases = result.get("cases", {})
    ref: dict[str, float] = {}
    for m in MEASUREMENTS:
        vals = [cases[k][m]["value"] for k in KERNEL_CASES if k in cases and m in cases[k]]
        if vals:
            ref[m] = sum(vals) / len(vals)
    return ref


def ratios(result: dict) -> dict[str, dict[str, float]]:
    """udrv case -> measurement -> udrv/kernel."""
    ref = kernel_reference(result)
    return {name: {m: case[m]["value"] / ref[m] if ref.get(m) else float("nan") for m in MEASUREMENTS
                   if m in case and m in ref}
            for name, case in result.get("cases", {}).items() if name not in KERNEL_CASES}


def render_report(result: dict) -> str:
    cfg = result.get("config", {})
    host = result.get("host", {})
    cases = result.get("cases", {})
    rat = ratios(result)
    ref = kernel_reference(result)
    model = cfg.get("model", "e1000")
    load = host.get("loadavg_before"), host.get("loadavg_after")
    L: list[str] = [
        f"# udrv {model} vs the kernel's {model} driver, side by side",
        "",
        f"One QEMU guest boot ({host.get('guest_seconds', '?')} s): `-device {model}` ({MODEL_IDS.get(model, '?')}) "
        f"behind an emulated Intel IOMMU, TCG, {host.get('smp', '?')} vCPU, guest kernel "
        f"{result.get('kernel_release', '?')}, {host.get('qemu', '')}. The same device is driven by the kernel's "
        f"driver, then (after `udrv bind`) by udrv's daemon over vfio-pci, then (after `udrv unbind`) by the "
        f"kernel's driver again. Peer: QEMU's host TAP in a network namespace of its own, running `iperf3 -s`. "
        f"{cfg.get('seconds')} s per iperf3 run, median of {cfg.get('rounds')}. Ratios are against the mean of "
        f"the two kernel runs.",
        "",
        f"Host load average (1 min) before / after: {load[0]} / {load[1]} on {host.get('host_cpus', '?')} cores "
        "(the host is shared: TCG speed, hence every absolute number here, moves with it; the ratios of one run "
        "are what this bench is for).",
        ""]
    if "error" in result:
        L += [f"**The run stopped at stage `{result.get('stage')}`: {result['error']}**", ""]
    kern = [n for n in KERNEL_CASES if n in cases]
    names = [n for n in cases if n not in KERNEL_CASES]
    L += ["## Throughput", ""]
    cols = [cases[n].get("_label", n) for n in kern] + ["kernel (mean)"] + [cases[n].get("_label", n) for n in names]
    L += ["| measurement | " + " | ".join(cols) + " | " + " | ".join(f"{cases[n].get('_label', n)} / kernel"
                                                                   for n in names) + " |",
          "|" + "---|" * (2 + len(kern) + 2 * len(names))]
    for m in MEASUREMENTS:
        row = [LABELS[m]] + [f"{cases[n][m]['value']:.1f}" if m in cases[n] else "-" for n in kern]
        row.append(f"{ref[m]:.1f}" if m in ref else "-")
        row += [f"{cases[n][m]['value']:.1f}" if m in cases[n] else "-" for n in names]
        row += [f"**{rat[n][m]:.3f}**" if m in rat.get(n, {}) else "-" for n in names]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    for n in names:
        if rat.get(n):
            L.append(f"- {cases[n].get('_label', n)}: udrv/kernel = "
                     + ", ".join(f"{m} {v:.3f}" for m, v in rat[n].items()) + " (target >= 0.9)")
        gro = cases[n].get("_status", {}).get("rx_coalesce")
        if gro and gro.get("super_frames"):
            L.append(f"- {cases[n].get('_label', n)}, RX coalescing over all measurements: {gro['segments']} TCP "
                     f"segments written as {gro['super_frames']} GSO super-frames "
                     f"({gro['segments'] / gro['super_frames']:.1f} per super-frame), "
                     f"{gro['bad_checksum']} bad checksums left alone, {gro['refused']} refused by the TAP, "
                     f"{gro.get('acks_merged', 0)} pure ACKs merged into a newer one of their flow")
    iso, one = cases.get("udrv_c"), cases.get("udrv_c-inproc")
    if iso and one:
        L.append("- what the driver domain costs, supervised ÷ in one process, same run: "
                 + ", ".join(f"{m} {iso[m]['value'] / one[m]['value']:.3f}" for m in MEASUREMENTS
                             if m in iso and m in one and one[m]["value"]) + " (target >= 0.95 for TCP)")
    L.append("")
    if any(v < 1 for r in rat.values() for v in r.values()):
        L += render_where_time_goes(result)
    L += render_recovery(result)
    return "\n".join(L) + "\n"


def render_where_time_goes(result: dict) -> list[str]:
    cases = result["cases"]
    L = ["## Where the time goes", "",
         "CPU during each measurement, from /proc/stat (the whole guest) and /proc/<pid>/stat (udrv's daemon). "
         "Frames = rx+tx packets counted on the interface the traffic used (eth0 or udrv0); per-frame cost = "
         "CPU time / frames.", "",
         "| case | measurement | guest busy | user | sys | softirq | daemon user s | daemon sys s | frames "
         "| guest us/frame | daemon us/frame | iperf3 CPU |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, case in cases.items():
        for m in MEASUREMENTS:
            if m not in case:
                continue
            c = case[m]["cpu"]
            L.append(f"| {case.get('_label', n)} | {m} | {c['busy_pct']}% | {c['user_pct']}% | {c['system_pct']}% | "
                     f"{c['softirq_pct']}% | {c['daemon_user_s']} | {c['daemon_sys_s']} | {c['frames']} | "
                     f"{c['guest_us_per_frame']} | {c.get('daemon_us_per_frame', '-')} | {c['iperf3_cpu_pct']}% |")
    L.append("")
    k = cases.get("kernel", {})
    for n, case in cases.items():
        if n in KERNEL_CASES:
            continue
        for m in ("tcp_tx", "udp64_tx"):
            if m in case and m in k:
                c, kc = case[m]["cpu"], k[m]["cpu"]
                wall = c["wall_s"] or 1
                L.append(f"- {case.get('_label', n)}, {m}: the daemon used "
                         f"{100 * (c['daemon_user_s'] + c['daemon_sys_s']) / wall:.0f}% of the wall time "
                         f"({c['daemon_user_s']} s user / {c['daemon_sys_s']} s sys), "
                         f"{c.get('daemon_us_per_frame')} us of daemon CPU per frame; the whole guest spent "
                         f"{c['guest_us_per_frame']} us per frame against {kc['guest_us_per_frame']} us with the "
                         f"kernel driver (guest busy {c['busy_pct']}% vs {kc['busy_pct']}%).")
    rtts = [(case.get("_label", n), case["tcp_tx"]["cpu"]["tcp_rtt_ms"]) for n, case in cases.items()
            if "tcp_rtt_ms" in case.get("tcp_tx", {}).get("cpu", {})]
    if len(rtts) > 1:
        L.append("- latency under load (tcp_tx: the mean RTT the sending TCP measured in the run above): "
                 + ", ".join(f"{label} {v:.1f} ms" for label, v in rtts) + ".")
    L.append("")
    for n, case in cases.items():
        prof = case.get("_profile")
        if not prof:
            continue
        for m, p in prof.items():
            L.append(f"### py-spy: {case.get('_label', n)} during {m} (a separate {result['config']['seconds']} s "
                     "run; busy samples only, 100 Hz)")
            L.append("")
            if "error" in p:
                L += [p["error"], ""]
                continue
            L += [f"{p['samples']} samples. By what the innermost Python frame does:", "",
                  "| share | where |", "|---|---|"]
            L += [f"| {share}% | {cat} |" for cat, share in p.get("categories", [])]
            L += ["", "| self time | function | | inclusive | function |", "|---|---|---|---|---|"]
            for i in range(max(len(p["self"]), len(p["inclusive"]))):
                s = p["self"][i] if i < len(p["self"]) else ("", "")
                c = p["inclusive"][i] if i < len(p["inclusive"]) else ("", "")
                L.append(f"| {s[1]}% | `{s[0]}` | | {c[1]}% | `{c[0]}` |")
            L.append("")
    return L


def recovery_table(recovery: list[dict]) -> list[str]:
    """Checkpoint vs full restart per fault (the gap the 1 ms probe saw), then each run's
    baseline and counts; a run that failed says why."""
    runs = {r["mode"]: r for r in recovery if "error" not in r}
    L = [f"- {r['mode']} run failed: {r['error']}" for r in recovery if "error" in r]
    if not runs:
        return L
    ck, rs = runs.get("checkpoint"), runs.get("restart")

    def pct(r: dict | None, f: str, p: float, key: str = "gaps_ms") -> str:
        xs = (r or {}).get(key, {}).get(f, []) if key == "gaps_ms" else (r or {}).get("per_fault", {}).get(f, {}).get(key, [])
        return f"{percentile(xs, p):.1f}" if xs else "-"

    L += ["| fault | n | checkpoint p50 | checkpoint p99 | full restart p50 | full restart p99 | checkpoint shorter by "
          "| shorter by, above the idle floor "
          "| daemon-side p50: checkpoint (restore + datapath) / full restart | shorter by, daemon-side |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for f in list((ck or rs)["gaps_ms"]):
        g = ck["gaps_ms"].get(f, []) if ck else []
        h = rs["gaps_ms"].get(f, []) if rs else []
        shorter = (f"{(1 - percentile(g, 50) / percentile(h, 50)) * 100:.0f}%"
                   if g and h and percentile(h, 50) and not f.endswith(":none") else "-")
        above = shorter_above_floor(g, h, (ck or {}).get("gaps_ms", {}).get(IDLE_CONTROL, []),
                                    (rs or {}).get("gaps_ms", {}).get(IDLE_CONTROL, [])) if not f.endswith(":none") else "-"
        dc = (ck or {}).get("per_fault", {}).get(f, {}).get("daemon_ms", [])
        dr = (rs or {}).get("per_fault", {}).get(f, {}).get("daemon_ms", [])
        own = (f"{pct(ck, f, 50, 'daemon_ms')} ({pct(ck, f, 50, 'restore_ms')} + {pct(ck, f, 50, 'datapath_ms')}) / "
               f"{pct(rs, f, 50, 'daemon_ms')}") if dc or dr else "-"
        own_shorter = (f"{(1 - percentile(dc, 50) / percentile(dr, 50)) * 100:.0f}%"
                       if dc and dr and percentile(dr, 50) else "-")
        L.append(f"| {f} | {len(g) or len(h)} | {pct(ck, f, 50)} | {pct(ck, f, 99)} | {pct(rs, f, 50)} | "
                 f"{pct(rs, f, 99)} | {shorter} | {above} | {own} | {own_shorter} |")
    L += ["", f"- `{IDLE_CONTROL}`: the same windows with nothing injected — the largest gap the guest's own "
          "scheduling (TCG) puts between replies, the floor under every row. `above the idle floor`: the same "
          f"p50s with each run's own `{IDLE_CONTROL}` p50 taken off first (what the fault added to the gap the "
          "guest leaves anyway; a checkpoint gap at the floor counts as 0; '-' when the restart adds under 1 ms). Daemon-side: the daemon's own "
          "records (`udrv status`), fault caught -> datapath re-armed, for a restart until the fresh driver is up; "
          "no probe, so no scheduling floor.",
          "- seconds between injections, so that one interruption never runs into the next: "
          + "; ".join(f"{r['mode']}: " + ", ".join(f"{f.split(':')[0]} {v}" for f, v in r.get("spacing_s", {}).items())
                      for r in (ck, rs) if r) + "."]
    for r in (ck, rs):
        if r:
            lost = r["sent"] - r["received"]
            L.append(f"- {r['mode']}: baseline (no fault) largest gap {r['baseline_gap_ms']:.1f} ms; probe "
                     f"{r['received']}/{r['sent']} answered ({lost} lost, {r.get('duplicates', '?')} answered twice: "
                     f"frames re-issued after a recovery that the device had already sent); recoveries {r['recoveries']}, "
                     f"escalations {r['escalations']}, restarts {r['restarts']}, implementation at the end "
                     f"{r['implementation']}")
    L.append("")
    return L


def render_recovery(result: dict) -> list[str]:
    if not result.get("recovery"):
        return []
    L = ["## Recovery latency", "",
         "A UDP packet every 1 ms from the guest across udrv0 to the peer's echo (`udrv.bench.probe`, its own "
         "process); per injected fault the interruption is the largest gap between consecutive probe replies in "
         "the window after the injection (ms). Checkpoint = in-process rollback + device restore + one retry "
         "(FGFT); full restart = `NicOptions(recovery=\"restart\")`: every fault escalates to a fresh driver "
         "instance, probe, config replay and journal re-issue. Both runs use the C ring alone (no implementation "
         "swap). `daemon-side` is the daemon's own record (`udrv status`): fault caught -> device restored (restore) "
         "-> datapath re-armed (datapath); for a full restart until the fresh driver is up.", ""]
    L += recovery_table(result["recovery"])
    L += [f"- `{PROMISC_CONTROL}` is the control for `set_rx_mode:raise`: the same `ip link set udrv0 promisc "
          "on/off` with no fault. QEMU's e1000 model refuses RX for 1 s after every RCTL write (its "
          "flush_queue_timer), so there a promiscuous toggle costs ~1 s of RX through any driver; a full restart "
          "re-programs RCTL and pays it every time, a checkpoint restore rewrites RCTL only when it differs.",
          "- `link_check:hang` is caught by the guard's watchdog at the link check's deadline (a quarter of the "
          "1 s configuration deadline); the daemon's single loop serves no frames while the hung entry point runs, "
          "so the gap is about that deadline.", ""]
    return L


# --- the chart ------------------------------------------------------------------------------------

COLORS = [(0x44, 0x55, 0x66), (0x99, 0xA3, 0xAD), (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)]


def chart_panels(result: dict) -> list[tuple[str, list[str], list[tuple[str, list[float]]]]]:
    """(title, group labels, [(series label, values per group)]) per panel."""
    cases = result.get("cases", {})
    panels = []
    for title, ms in (("TCP, Mbit/s", ("tcp_tx", "tcp_rx")), ("UDP 64 B, kpps received", ("udp64_tx", "udp64_rx"))):
        order = [n for n in KERNEL_CASES if n in cases] + [n for n in cases if n not in KERNEL_CASES]
        series = [(cases[n].get("_label", n), [cases[n][m]["value"] if m in cases[n] else 0.0 for m in ms])
                  for n in order]
        if series:
            panels.append((title, [m.split("_")[-1] for m in ms], series))
    runs = result.get("recovery", [])
    if runs:
        faults = list(runs[0]["gaps_ms"])
        series = [(f"{r['mode']} p50", [percentile(r["gaps_ms"].get(f, []), 50) for f in faults]) for r in runs]
        panels.append(("recovery: largest probe gap p50, ms", [f.replace(":", "\n") for f in faults], series))
    return panels


def write_chart(result: dict, path: Path) -> Path:
    panels = chart_panels(result)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png_bars(path, panels)
        return path
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.2))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (title, groups, series) in zip(axes, panels):
        width = 0.8 / max(1, len(series))
        for i, (label, vals) in enumerate(series):
            xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=label, color=[c / 255 for c in COLORS[i % len(COLORS)]])
            ax.bar_label(bars, fmt="%.0f" if max(vals or [0]) >= 100 else "%.1f", fontsize=7)
        if title.startswith("recovery"):
            ax.set_yscale("log")          # tens of ms next to seconds
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"udrv vs kernel: {result.get('config', {}).get('model', 'e1000')} in QEMU/TCG", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_png_bars(path: Path, panels: list, width: int = 900, height: int = 320) -> None:
    """Without matplotlib: the same panels as plain bars (no text; colours in series order:
    kernel dark grey, kernel again light grey, C ring blue, Python ring orange), each panel
    scaled to its maximum."""
    import struct
    import zlib
    img = [[(255, 255, 255)] * width for _ in range(height)]

    def rect(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(height, y1)):
            row = img[y]
            for x in range(max(0, x0), min(width, x1)):
                row[x] = rgb
    pw = width // max(1, len(panels))
    for p, (_title, groups, series) in enumerate(panels):
        x0, top, base = p * pw + 20, 20, height - 20
        rect(x0, base, x0 + pw - 40, base + 2, (0, 0, 0))
        vmax = max([v for _, vals in series for v in vals if v == v] + [1e-9])
        gw = (pw - 40) // max(1, len(groups))
        bw = max(2, (gw - 10) // max(1, len(series)))
        for g in range(len(groups)):
            for i, (_label, vals) in enumerate(series):
                v = vals[g] if vals[g] == vals[g] else 0.0
                h = int((base - top) * v / vmax)
                bx = x0 + g * gw + 5 + i * bw
                rect(bx, base - h, bx + bw - 2, base, COLORS[i % len(COLORS)])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)


# =============================================================================================
# entry point: python3 -m udrv.bench.sidebyside guest CONFIG OUT | daemon ... | report RESULTS.json OUTDIR
# =============================================================================================

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["guest"] and len(argv) == 3:
        cfg = json.loads(Path(argv[1]).read_text())
        cfg["faults"] = tuple(cfg.get("faults", FAULTS))
        return guest_main(GuestConfig(**cfg), Path(argv[2]))
    if argv[:1] == ["report"] and len(argv) == 3:          # re-render from a results.json
        result = json.loads(Path(argv[1]).read_text())
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(render_report(result))
        write_chart(result, out / "throughput.png")
        return 0
    print("usage: udrv bench e1000 [--out DIR] (host); python3 -m udrv.bench.sidebyside guest CONFIG OUT | "
          "report RESULTS.json OUTDIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
