"""Bench (a command, not a test): iperf3 through udrv's cdc_ecm vs the kernel's cdc_ether on the
same configfs f_ecm gadget (dummy_hcd), in one guest boot, so the ratio compares like with like.

    sudo python3 -m udrv.bench.cdc_ecm [--seconds 5] [--smp 2]     (or: python3 tools/bench_cdc_ecm.py)

Inside the guest, for each datapath: the gadget's usb0 sits in a peer namespace (10.78.0.2) and
runs the iperf3 server; the host side (10.78.0.1) is first the kernel's cdc_ether netdev, then
udrv0 with the pure-Python UsbNetEngine, then (when the C fast path is built) udrv0 with the C
NativeUsbRing, both run by `udrv run` (the C ring reads the TAP, writes RX frames to it and
runs its turns in a C loop). TX = host -> gadget, RX = gadget -> host (-R). The C ring runs
--rounds times (default 3), each round after a kernel run, and the kernel runs once more at the
end: ratios are of the medians (TCG speed drifts with the shared host within one boot).
With --compare-no-coalesce the C ring also runs with RX coalescing off (UDRV_RX_COALESCE=0),
before the default one, in the same boot; --compare-no-offload likewise with the ring's software
TX offloads off (UDRV_OFFLOADS=none: one TAP read per wire frame), --compare-one-thread with the
ring's TX half on the daemon's own thread (UDRV_TX_THREAD=0), --compare-no-placement with the
daemon left where the scheduler puts it (UDRV_CPU_PLACEMENT=0, udrv/placement.py), --compare-aqm S
with CoDel on the TX journal set otherwise (UDRV_AQM=S: off, or TARGET/INTERVAL in ms such as
1/10; repeatable; in every round, after the C ring); --skip-python
leaves the Python engine out. Then (C ring) recovery latency on the real gadget: a 1 ms UDP probe
from the host side to an echo behind usb0 while faults are injected into the running daemon,
recovered by checkpoint, then by a full restart (`udrv run --recovery restart`), 10 of each
(--no-recovery skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .all import AQM_VARIANT, INPROC
from .sidebyside import steady_state

VID, PID = 0x0525, 0xA4A1
NS, HOST_IP, PEER_IP = "benchpeer", "10.78.0.1", "10.78.0.2"


def sh(*cmd: str, timeout: float = 60.0, check: bool = True) -> str:
    cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp.stdout


def iperf(seconds: int, reverse: bool) -> tuple[float, float | None]:
    """Mbit/s received, and the mean RTT in ms that the sending TCP measured when the sender is
    this side (TX; None for -R); a server that was not listening yet (a loaded machine) gets two
    more tries."""
    for _ in range(2):
        try:
            return _iperf(seconds, reverse)
        except RuntimeError as e:
            if "unable to connect" not in str(e):
                raise
            time.sleep(1)
    return _iperf(seconds, reverse)


def _iperf(seconds: int, reverse: bool) -> tuple[float, float | None]:
    srv = subprocess.Popen(["ip", "netns", "exec", NS, "iperf3", "-s", "-1", "-B", PEER_IP],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.7)
    try:
        out = sh("iperf3", "-c", PEER_IP, "-t", str(seconds), "-J", *(["-R"] if reverse else []),
                 timeout=seconds + 40, check=False)
        r = json.loads(out)
        if "error" in r:
            raise RuntimeError(f"iperf3 {'-R ' if reverse else ''}failed: {r['error']}")
        from udrv.bench.sidebyside import tcp_sender_rtt_ms
        return r["end"]["sum_received"]["bits_per_second"] / 1e6, None if reverse else tcp_sender_rtt_ms(r)
    finally:
        srv.kill()
        srv.wait()


def _busy() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return sum(f) - f[3] - f[4], sum(f)          # busy, total jiffies over all vCPUs


def _proc_cpu(pid: int | None) -> tuple[float, float]:
    """user, system CPU seconds of a process (all threads)."""
    if not pid:
        return 0.0, 0.0
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tck, int(f[12]) / tck


def _thread_cpu(pid: int | None) -> dict[str, float]:
    """user+system CPU seconds per thread of a process, keyed 'main' (the loop) or by the
    thread's name (the C ring's TX half is 'udrv-ring-tx'); same-named threads add up."""
    out: dict[str, float] = {}
    if not pid:
        return out
    tck = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            head, rest = task.joinpath("stat").read_text().rsplit(")", 1)
        except OSError:                     # the thread ended meanwhile
            continue
        name = "main" if task.name == str(pid) else head.split("(", 1)[1]
        f = rest.split()
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tck
    return out


def ping_beside(seconds: int) -> subprocess.Popen:
    """A ping every 100 ms to the peer while iperf3 runs: what an interactive flow beside the bulk
    one waits (the queue in front of the device, seen from outside TCP)."""
    return subprocess.Popen(["busybox", "ping", "-i", "0.1", "-w", str(seconds + 1), PEER_IP],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def ping_p50(p: subprocess.Popen) -> float | None:
    """The median reply time in ms, leaving out the first second (iperf3's server start and
    TCP's slow start)."""
    import re
    out = p.communicate(timeout=30)[0]
    ms = sorted(float(t) for seq, t in re.findall(r"seq=(\d+) ttl=\d+ time=([\d.]+) ms", out) if int(seq) >= 10)
    return ms[len(ms) // 2] if ms else None


def iperf_cpu(seconds: int, pid: int | None) -> tuple[dict, dict]:
    """Both directions, with where the CPU went: the share of all the guest's vCPUs that was
    busy, udrv's daemon user/system seconds per wall second (1.0 = one vCPU) and the same per
    thread (a thread near 1.0 sets the pace whatever the rest of the guest does); with TX the
    RTT the sending TCP saw ("tx_rtt_ms") and a ping's beside it ("tx_ping_ms", median): the
    queue in front of the device under load."""
    vals, cpu = {}, {}
    for way, rev in (("tx", False), ("rx", True)):
        b0, c0, t0, th0 = _busy(), _proc_cpu(pid), time.monotonic(), _thread_cpu(pid)
        ping = None if rev else ping_beside(seconds)
        vals[way], rtt = iperf(seconds, rev)
        if rtt is not None:
            vals[f"{way}_rtt_ms"] = rtt
        if ping is not None:
            vals[f"{way}_ping_ms"] = ping_p50(ping)
        b1, c1, wall, th1 = _busy(), _proc_cpu(pid), time.monotonic() - t0, _thread_cpu(pid)
        cpu[way] = {"guest_busy": round((b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 2),
                    "vcpus": os.cpu_count(),
                    "daemon_user": round((c1[0] - c0[0]) / wall, 2) if pid else None,
                    "daemon_sys": round((c1[1] - c0[1]) / wall, 2) if pid else None,
                    "daemon_threads": {k: round((v - th0.get(k, 0.0)) / wall, 2)
                                       for k, v in sorted(th1.items(), key=lambda kv: -kv[1])
                                       if v - th0.get(k, 0.0) > 0.005 * wall} if pid else None}
    return vals, cpu


def reachable() -> bool:
    """The peer answers (a first ARP lost to a link still coming up fails iperf3's connect)."""
    return subprocess.run(["busybox", "ping", "-c", "1", "-W", "1", PEER_IP], capture_output=True).returncode == 0


def diagnostics() -> str:
    """What the links looked like when the peer did not answer (one line per command)."""
    out = []
    for cmd in (["ip", "-br", "link"], ["ip", "-br", "addr"], ["ip", "neigh"], ["ip", "-n", NS, "-br", "addr"],
                ["ip", "-n", NS, "-s", "-br", "link"], ["dmesg"]):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as e:
            text = [str(e)]
        out.append(f"{' '.join(cmd)}: " + " | ".join(text[-6:]))
    return "\n".join(out)


def wait_reachable(what: str, ifname: str, gadget_if: str) -> None:
    """Wait for the peer to answer; once, bounce the gadget's interface and ours: f_ecm tells the
    host about its link in a NETWORK_CONNECTION notification when usb0 opens, and when that one
    is lost (seen after usb0 moved into the namespace) cdc_ether keeps the carrier off for good;
    then fail with the links' state."""
    try:
        wait(reachable, 10, what)
        return
    except RuntimeError:
        pass
    for cmd in (["ip", "-n", NS, "link", "set", gadget_if, "down"], ["ip", "link", "set", ifname, "down"],
                ["ip", "-n", NS, "link", "set", gadget_if, "up"], ["ip", "link", "set", ifname, "up"]):
        sh(*cmd)
    try:
        wait(reachable, 20, what)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{diagnostics()}") from None


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def udrv_up(cmd: list[str], log: Path, what: str, gif: str, env: dict | None = None) -> subprocess.Popen:
    """`udrv run` in a child process, up and addressed, the gadget answering through udrv0."""
    p = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait(lambda: os.path.exists("/run/udrv/udrv0.sock") and p.poll() is None, 90, f"udrv ({what})")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "udrv0")
        time.sleep(1)
        wait_reachable(f"the gadget to answer through udrv ({what})", "udrv0", gif)
        # measured is the driver's process (the worker under a supervisor), once its spare is up
        p.driver_pid = steady_state(_status) or p.pid            # type: ignore[attr-defined]
    except BaseException:
        udrv_down(p)
        raise
    return p


def _status() -> dict:
    from udrv.control import request
    return request("udrv0", {"cmd": "status"}, timeout=10.0)["status"]


def udrv_down(p: subprocess.Popen) -> None:
    """SIGTERM (the daemon gives the device back), then wait for udrv0 to go."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
    wait(lambda: not os.path.exists("/sys/class/net/udrv0"), 20, "udrv0 to go away")


class _RunningDaemon:
    """`udrv run` in a child process, as sidebyside.recovery_run drives it (inject, status)."""

    def __init__(self, proc: subprocess.Popen, recovery: str):
        self.proc, self.recovery, self.impl = proc, recovery, "c"

    def inject(self, entry: str, kind: str) -> None:
        from udrv.control import request
        r = request("udrv0", {"cmd": "inject", "entry": entry, "kind": kind, "count": 1}, timeout=10.0)
        if not r.get("ok"):
            raise RuntimeError(f"udrv inject {entry} {kind}: {r.get('error')}")

    def status(self) -> dict:
        from udrv.control import request
        return request("udrv0", {"cmd": "status"}, timeout=10.0)["status"]


RECOVERY_FAULTS = ("xmit:raise", "poll:stall", "poll:timeout")


def recovery_runs(run: list[str], gif: str, out: Path, repeats: int) -> list[dict]:
    """The 1 ms probe from the host side across udrv0 to an echo on the gadget's side, with
    faults injected into the running daemon: checkpoint recovery, then every fault by a full
    restart (close, re-probe, re-open), in the same boot (sidebyside.recovery_run)."""
    from udrv.bench.sidebyside import ECHO_PORT, GuestConfig, recovery_run
    echo = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "udrv.bench.echo", "--port", str(ECHO_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = GuestConfig(host_ip=PEER_IP, guest_ip=HOST_IP, faults=RECOVERY_FAULTS, repeats=repeats, ifname="udrv0")
    runs = []
    try:
        for mode in ("checkpoint", "restart"):
            log = out.parent / f"bench-recovery-{mode}.log"
            p = None
            try:
                # one implementation throughout (no swap to the Python engine after 3 escalations)
                p = udrv_up(run + ["--recovery", mode, "--swap-after", "0"], log, mode, gif)
                runs.append(recovery_run(cfg, _RunningDaemon(p, mode)))
            except Exception as e:
                runs.append({"mode": mode, "error": f"{type(e).__name__}: {e}", "log": log.read_text()[-2000:]})
            finally:
                if p is not None:
                    udrv_down(p)
    finally:
        echo.terminate()
        echo.wait(10)
    return runs


def usbfs_floor(seconds: float, n_inflight: int = 64) -> dict:
    """The usbfs floor on this gadget (udrv.bench.usbfloor): 1514-byte frames, 64 bulk OUT
    transfers queued, one thread, nothing else. The frames go to a MAC nobody has, so the
    gadget's stack drops them early: the device side costs less than under iperf3, and the
    figure is a lower bound on what submit + reap cost any usbfs driver per frame."""
    import usb1
    from .usbfloor import usb_floor
    control, data = -1, None
    with usb1.USBContext() as ctx:
        dev = ctx.getByVendorIDAndProductID(VID, PID)
        for cfg in dev.iterConfigurations():
            for itf in cfg:
                for st in itf:
                    if st.getClass() == 0x02 and st.getSubClass() == 0x06:
                        control = st.getNumber()
                    outs = [e.getAddress() for e in st if e.getAttributes() & 3 == 2 and not e.getAddress() & 0x80]
                    if st.getClass() == 0x0A and outs and data is None:
                        data = (st.getNumber(), st.getAlternateSetting(), outs[0])
    if data is None:
        raise RuntimeError("the gadget shows no CDC data interface with a bulk OUT endpoint")
    frame = bytes.fromhex("020000000099" "020000000098") + b"\x88\xb5" + bytes(1500)
    return usb_floor(VID, PID, control, *data, frame, n_inflight, float(seconds))


def kernel_again(dev: Path, gif: str, seconds: int) -> tuple[dict, dict]:
    """cdc_ether once udrv gave the device back: rebound, addressed, measured both ways."""
    from udrv.testbed.configfs import interface_netdevs
    wait(lambda: interface_netdevs(dev, 0), 20, "cdc_ether to take the device back")
    kif = interface_netdevs(dev, 0)[0]
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", kif)
    sh("ip", "link", "set", kif, "up")
    wait_reachable("the gadget to answer through cdc_ether again", kif, gif)
    try:
        return iperf_cpu(seconds, None)
    finally:
        sh("ip", "addr", "flush", "dev", kif)


def guest_bench(seconds: int, out: Path, no_coalesce: bool = False, python: bool = True,
                no_offload: bool = False, one_thread: bool = False, no_placement: bool = False,
                recovery_repeats: int = 10, rounds: int = 1, aqm: tuple[str, ...] = ()) -> None:
    from udrv.testbed.configfs import ecm_gadget, interface_netdevs, modprobe, wait_host_device
    res: dict = {"seconds": seconds}
    try:
        modprobe("dummy_hcd", "cdc_ether", "tun")
        g = ecm_gadget(vid=VID, pid=PID)
        g.bind()
        dev = wait_host_device(VID, PID)
        wait(lambda: interface_netdevs(dev, 0), 10, "cdc_ether's netdev")
        kif = interface_netdevs(dev, 0)[0]
        gif = g.function_attr("ecm.usb0", "ifname")
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "set", gif, "netns", NS)
        sh("ip", "-n", NS, "addr", "add", f"{PEER_IP}/24", "dev", gif)
        sh("ip", "-n", NS, "link", "set", gif, "up")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", kif)
        sh("ip", "link", "set", kif, "up")
        time.sleep(1)
        wait_reachable("the gadget to answer through cdc_ether", kif, gif)
        res["kernel"], res["kernel_cpu"] = iperf_cpu(seconds, None)
        sh("ip", "addr", "flush", "dev", kif)

        # both through the real daemon (`udrv run`): UDRV_DATAPATH=python forces the Python engine,
        # without it udrv runs the C ring when it is built
        run = [sys.executable, "-m", "udrv.cli", "run", f"usb:{VID:04x}:{PID:04x}", "--ifname", "udrv0",
               "--duration", "600"]
        variants = [("python", run, {"UDRV_DATAPATH": "python"})] if python else []
        try:
            from udrv import fastpath
            if fastpath.available():
                if no_coalesce:
                    variants.append(("native-nocoalesce", run, {"UDRV_RX_COALESCE": "0"}))
                if no_offload:
                    variants.append(("native-nooffload", run, {"UDRV_OFFLOADS": "none"}))
                if one_thread:
                    variants.append(("native-1thread", run, {"UDRV_TX_THREAD": "0"}))
                if no_placement:
                    variants.append(("native-noplacement", run, {"UDRV_CPU_PLACEMENT": "0"}))
                for setting in aqm:
                    variants.append((f"{AQM_VARIANT}{setting}", run, {"UDRV_AQM": setting}))
                variants.append(("native", run, {}))
                # the same C ring without the supervisor, worker and spare: what isolation costs
                variants.append((INPROC, run, {"UDRV_ISOLATION": "0"}))
            else:
                res["native_unavailable"] = fastpath.why_unavailable()
        except ImportError as e:
            res["native_unavailable"] = str(e)
        for name, cmd, env in variants:
            log = out.parent / f"bench-{name.replace('=', '-').replace('/', '-')}.log"
            p = None
            try:
                p = udrv_up(cmd, log, name, gif, env)
                res[name], res[f"{name}_cpu"] = iperf_cpu(seconds, p.driver_pid)
                from udrv.control import request
                st = request("udrv0", {"cmd": "status"})
                res[f"{name}_rx_coalesce"] = st.get("status", {}).get("rx_coalesce")
                res[f"{name}_tx_journal"] = st.get("status", {}).get("tx_journal")
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {e}", "log": log.read_text()[-2000:]}
            finally:
                if p is not None:
                    udrv_down(p)
        # more rounds, kernel and C ring in turn: TCG speed drifts with the shared host within
        # one boot (cdc_ether 168-210 Mbit/s seen), so the ratio is of the medians of runs that
        # alternate rather than of one run each
        if "native" in res and "error" not in res["native"]:
            for i in range(rounds - 1):
                k, _ = kernel_again(dev, gif, seconds)
                res.setdefault("kernel_more", []).append(k)
                log = out.parent / f"bench-native-round{i + 2}.log"
                p = udrv_up(run, log, f"native, round {i + 2}", gif)
                try:
                    res.setdefault("native_more", []).append(iperf_cpu(seconds, p.driver_pid)[0])
                finally:
                    udrv_down(p)
                log = out.parent / f"bench-{INPROC}-round{i + 2}.log"
                p = udrv_up(run, log, f"{INPROC}, round {i + 2}", gif, {"UDRV_ISOLATION": "0"})
                try:
                    res.setdefault(f"{INPROC}_more", []).append(iperf_cpu(seconds, p.driver_pid)[0])
                finally:
                    udrv_down(p)
                for setting in aqm:     # the A/B in every round too: CoDel set otherwise, or off
                    name = f"{AQM_VARIANT}{setting}"
                    log = out.parent / f"bench-native-aqm-{setting.replace('/', '-')}-round{i + 2}.log"
                    p = udrv_up(run, log, f"{name}, round {i + 2}", gif, {"UDRV_AQM": setting})
                    try:
                        res.setdefault(f"{name}_more", []).append(iperf_cpu(seconds, p.driver_pid)[0])
                    finally:
                        udrv_down(p)
        if "native" in res and "error" not in res["native"]:
            try:
                res["usbfs_floor"] = usbfs_floor(seconds)
            except Exception as e:
                res["usbfs_floor"] = {"error": f"{type(e).__name__}: {e}"}
        if recovery_repeats and "native" in res and "error" not in res["native"]:
            res["recovery"] = recovery_runs(run, gif, out, recovery_repeats)
        # the kernel again, now that udrv gave cdc_ether its interface back: the host is shared,
        # so the kernel's runs bracket udrv's and the ratios use their median
        res["kernel_after"], res["kernel_after_cpu"] = kernel_again(dev, gif, seconds)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    out.write_text(json.dumps(res, indent=1))


def report(res: dict) -> str:
    from udrv.bench.all import cdc_runs
    k = {way: statistics.median(r[way] for r in cdc_runs(res, "kernel")) for way in ("tx", "rx")}
    lines = [f"iperf3 over the kernel's f_ecm gadget on dummy_hcd, {res['seconds']} s per direction, one guest boot",
             f"  kernel cdc_ether : TX {k['tx']:8.1f} Mbit/s   RX {k['rx']:8.1f} Mbit/s   "
             f"(median of {len(cdc_runs(res, 'kernel'))} runs)"]
    from udrv.bench.all import cdc_variants
    for name in ("python", "native-nocoalesce", "native-nooffload", "native-1thread", "native-noplacement",
                 *[n for n in cdc_variants(res) if n.startswith(AQM_VARIANT)], "native", INPROC):
        r = res.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"  udrv cdc_ecm ({name}): failed: {r['error']}")
            continue
        runs = cdc_runs(res, name)
        r = {way: statistics.median(x[way] for x in runs) for way in ("tx", "rx")}
        lines.append(f"  udrv cdc_ecm ({name:6}): TX {r['tx']:8.1f} Mbit/s   RX {r['rx']:8.1f} Mbit/s   "
                     f"ratio vs kernel TX {r['tx'] / k['tx']:.3f}  RX {r['rx'] / k['rx']:.3f}"
                     + (f"   (medians of {len(runs)} runs)" if len(runs) > 1 else ""))
        gro = res.get(f"{name}_rx_coalesce")
        if gro:
            lines.append(f"      rx coalescing {'on' if gro['on'] else 'off'}: {gro['segments']} segments in "
                         f"{gro['super_frames']} super-frames, {gro['bad_checksum']} bad checksums, "
                         f"{gro.get('acks_merged', 0)} ACKs merged")
    if res.get("native") and res.get(INPROC) and "error" not in res["native"] and "error" not in res[INPROC]:
        iso = {way: statistics.median(x[way] for x in cdc_runs(res, "native")) for way in ("tx", "rx")}
        one = {way: statistics.median(x[way] for x in cdc_runs(res, INPROC)) for way in ("tx", "rx")}
        lines.append(f"  the driver domain's cost, supervised ÷ in one process: TX {iso['tx'] / one['tx']:.3f}  "
                     f"RX {iso['rx'] / one['rx']:.3f} (target >= 0.95)")
    if "native_unavailable" in res:
        lines.append(f"  native ring not measured: {res['native_unavailable']}")
    from udrv.bench.all import tx_cpu_budget_lines, tx_rtt_lines, usbfs_floor_lines
    lines += tx_cpu_budget_lines(res)[:1] + usbfs_floor_lines(res)[:1] + tx_rtt_lines(res)[:1]
    if res.get("recovery"):
        from udrv.bench.sidebyside import recovery_table
        lines += ["", *recovery_table(res["recovery"])]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "guest":
        guest_bench(int(sys.argv[2]), Path(sys.argv[3]), no_coalesce="--no-coalesce" in sys.argv[4:],
                    python="--skip-python" not in sys.argv[4:], no_offload="--no-offload" in sys.argv[4:],
                    one_thread="--one-thread" in sys.argv[4:], no_placement="--no-placement" in sys.argv[4:],
                    aqm=tuple(x.split("=", 1)[1] for x in sys.argv[4:] if x.startswith("--aqm=")),
                    recovery_repeats=0 if "--no-recovery" in sys.argv[4:] else 10,
                    rounds=next((int(x.split("=", 1)[1]) for x in sys.argv[4:] if x.startswith("--rounds=")), 1))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="keep the guest's files (udrv logs) in DIR")
    ap.add_argument("--compare-no-coalesce", action="store_true",
                    help="also run the C ring with RX coalescing off (UDRV_RX_COALESCE=0)")
    ap.add_argument("--compare-no-offload", action="store_true",
                    help="also run the C ring without its software TX offloads (UDRV_OFFLOADS=none)")
    ap.add_argument("--compare-one-thread", action="store_true",
                    help="also run the C ring with its TX half on the daemon's thread (UDRV_TX_THREAD=0)")
    ap.add_argument("--compare-no-placement", action="store_true",
                    help="also run the C ring without CPU placement (UDRV_CPU_PLACEMENT=0)")
    ap.add_argument("--compare-aqm", action="append", default=[], metavar="SETTING",
                    help="also run the C ring with CoDel on its TX journal set otherwise, in every round: "
                         "UDRV_AQM's values (off, drop, TARGET/INTERVAL in ms such as 1/10); repeatable")
    ap.add_argument("--skip-python", action="store_true", help="leave the Python engine out")
    ap.add_argument("--no-recovery", action="store_true", help="skip the recovery-latency runs")
    ap.add_argument("--rounds", type=int, default=3,
                    help="C ring runs, each after a kernel run (ratios of the medians; default 3)")
    a = ap.parse_args()
    import tempfile
    from ..testbed import guest
    from .sidebyside import GUEST_ENV, REPO
    with tempfile.TemporaryDirectory(prefix="udrv-bench.") as tmp:
        tmp = a.keep or tmp
        out = Path(tmp) / "bench.json"
        extra = ((["--no-coalesce"] if a.compare_no_coalesce else []) + (["--skip-python"] if a.skip_python else [])
                 + (["--no-offload"] if a.compare_no_offload else [])
                 + (["--one-thread"] if a.compare_one_thread else [])
                 + (["--no-placement"] if a.compare_no_placement else [])
                 + [f"--aqm={x}" for x in a.compare_aqm]
                 + (["--no-recovery"] if a.no_recovery else []) + [f"--rounds={a.rounds}"])
        r = guest.run([guest.real_python(), "-m", "udrv.bench.cdc_ecm", "guest", str(a.seconds), str(out), *extra],
                      guest.GuestDevices(smp=a.smp), timeout=600, cwd=REPO, out_dir=tmp, env=GUEST_ENV)
        if not out.exists():
            print(f"bench: the guest wrote no result (exit {r.returncode}):\n{r.output[-3000:]}", file=sys.stderr)
            return 1
        res = json.loads(out.read_text())
    if "error" in res:
        print(f"bench failed: {res['error']}\n{json.dumps(res, indent=1)}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1) if a.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
