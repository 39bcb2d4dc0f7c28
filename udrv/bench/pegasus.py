"""Bench (not a test): pegasus.ko vs udrv's pegasus driver on the same USB device, one guest run.

The device is the pegasus model served over FunctionFS on dummy_hcd (udrv.testbed.pegasus_gadget);
its wire is a TAP in namespace `pegpeer` where the iperf3 server runs. Both drivers drive the
very same gadget in the same boot, one after the other: first the kernel's pegasus.ko
(netdev eth0), then `udrv run usb:07a6:8515` (which detaches pegasus.ko; netdev udrv0).
Reported: iperf3 TCP throughput and small-frame UDP rate each way, the udrv/kernel ratios, and how busy the gadget and
udrv processes were — the Python gadget is one GIL-bound process, so when its CPU share sits
near one vCPU it, not the driver, sets the pace for both.

    python3 -m udrv.bench.pegasus [--seconds 5] [--udp-pps 3000] [--smp 2] [--json]
                                                       (or: python3 tools/bench_usb.py ...)
    (inside a guest: python3 -m udrv.bench.pegasus --in-guest OUT.json --seconds 5)

TCP: iperf3 each way (Mbit/s). UDP: iperf3 offers --udp-pps minimum-size frames per second each
way; the rate that arrives (frames/s) shows the per-frame cost, which TCP hides behind size.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


IFNAME = "udrv0"
IPERF_PORT = 5201
UDRV_START_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- guest side -----------------------------------------------------------------------------------

def _cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def _guest_busy() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return sum(f) - f[3] - f[4], sum(f)          # busy, total (jiffies over all vCPUs)


UDP_PAYLOAD = 18                 # + 42 bytes of headers = a minimum-size 60-byte frame


@dataclass
class Run:
    path: str
    direction: str
    mbit_s: float
    retransmits: int | None
    seconds: float
    gadget_cpu: float          # CPU seconds per wall second (1.0 = one vCPU)
    udrv_cpu: float | None
    guest_busy: float          # fraction of all vCPUs
    tcp_rtt_ms: float | None = None  # TCP TX: the mean RTT the sending TCP measured (latency under load)


def iperf(path: str, server: str, bind: str, seconds: float, reverse: bool, udrv_pid: int | None,
          udp_pps: int = 0) -> Run:
    """TCP throughput, or with udp_pps the rate of minimum-size UDP frames that arrive when
    udp_pps are offered (reported as frames/s in mbit_s's place: see `unit`)."""
    me = os.getpid()
    c0, u0, b0, t0 = _cpu_s(me), _cpu_s(udrv_pid) if udrv_pid else 0.0, _guest_busy(), time.monotonic()
    cmd = ["iperf3", "-c", server, "-B", bind, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if udp_pps:
        cmd += ["-u", "-l", str(UDP_PAYLOAD), "-b", str(udp_pps * UDP_PAYLOAD * 8)]
    if reverse:
        cmd.append("-R")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - t0
    c1, u1, b1 = _cpu_s(me), _cpu_s(udrv_pid) if udrv_pid else 0.0, _guest_busy()
    rtt = None
    try:
        end = json.loads(cp.stdout)["end"]
        if udp_pps:
            got = end["sum"]["packets"] - end["sum"]["lost_packets"]
            mbit = got / end["sum"]["seconds"]               # frames/s delivered
            retr = end["sum"]["lost_packets"]
        else:
            mbit = end["sum_received"]["bits_per_second"] / 1e6
            retr = end.get("sum_sent", {}).get("retransmits")
            if not reverse:     # this side sends: the RTT its TCP measured
                from udrv.bench.sidebyside import tcp_sender_rtt_ms
                rtt = tcp_sender_rtt_ms({"end": end})
    except (ValueError, KeyError):
        raise RuntimeError(f"iperf3 {'-R ' if reverse else ''}on {path} failed: "
                           f"{(cp.stdout + cp.stderr).strip()[-600:]}") from None
    way = "peer->host (RX)" if reverse else "host->peer (TX)"
    if udp_pps:
        way = f"UDP 60B {way.split()[0]}"
    return Run(path, way, round(mbit, 2), retr, round(wall, 1),
               round((c1 - c0) / wall, 2), round((u1 - u0) / wall, 2) if udrv_pid else None,
               round((b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 2), rtt)


def _runs(path: str, peer: str, host: str, seconds: float, udp_pps: int, pid: int | None) -> list[dict]:
    out = []
    for pps in (0, udp_pps) if udp_pps else (0,):
        for rev in (False, True):
            for attempt in (1, 2):
                time.sleep(1.0)          # let the server finish the previous test
                try:
                    out.append(iperf(path, peer, host, seconds, rev, pid, pps).__dict__)
                    break
                except RuntimeError as e:
                    # iperf3's control connection shares the slow link; a flood can starve it
                    if attempt == 2:
                        out.append({"path": path, "direction": f"{'UDP 60B ' if pps else ''}"
                                    f"{'peer->host' if rev else 'host->peer'}", "error": str(e)[-300:]})
    return out


def in_guest(out: Path, seconds: float, udp_pps: int, rounds: int = 1) -> int:
    """pegasus.ko, then udrv, `rounds` times over, then pegasus.ko once more: TCG speed drifts
    with the shared host within one boot, so each side's runs alternate and the report compares
    their medians (benchall.pegasus_rows)."""
    from ..testbed.pegasus_gadget import (HOST_IP, NETNS, PEER_IP, PegasusRig, RigConfig, configure_host_side,
                                      quiet_ipv6, udp_ping, wait_carrier, wait_netdev)
    from ..testbed.configfs import interface_driver, modprobe, wait_for
    from .sidebyside import REPO
    quiet_ipv6()
    modprobe("dummy_hcd", "usb_f_fs", "tun")
    host, peer = HOST_IP.split("/")[0], PEER_IP.split("/")[0]
    report: dict = {"seconds": seconds, "rounds": rounds, "runs": []}
    with PegasusRig(RigConfig(gadget_name="pegbench")) as rig:
        server = subprocess.Popen(["ip", "netns", "exec", NETNS, "iperf3", "-s", "-B", peer, "-p", str(IPERF_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def kernel_phase(n: int) -> None:
            # pegasus.ko binds the gadget (again, once udrv gave it back)
            eth = wait_netdev(rig.host_device, "pegasus")
            configure_host_side(eth)
            wait_carrier(eth)
            if n == 1:
                report["kernel_ping"] = udp_ping(None, HOST_IP, NETNS, PEER_IP, 6)
            report["runs"] += [{**r, "round": n} for r in _runs("pegasus.ko", peer, host, seconds, udp_pps, None)]

        def udrv_phase(n: int) -> None:
            # udrv on the same gadget (it detaches pegasus.ko, and gives it back on SIGTERM)
            log = open(out.parent / f"udrv-bench-{n}.log", "w")
            udrv = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", "usb:07a6:8515", "--ifname", IFNAME,
                                     "--duration", str(8 * seconds + 120)], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO)
            try:
                sock = Path(f"/run/udrv/{IFNAME}.sock")
                wait_for(lambda: sock.exists() or udrv.poll() is not None, UDRV_START_TIMEOUT, "udrv run starting")
                report["driver_during_udrv"] = interface_driver(rig.host_device)
                configure_host_side(IFNAME)
                wait_carrier(IFNAME)
                if n == 1:
                    report["udrv_ping"] = udp_ping(None, HOST_IP, NETNS, PEER_IP, 6)
                report["runs"] += [{**r, "round": n} for r in _runs("udrv", peer, host, seconds, udp_pps, udrv.pid)]
                from udrv.control import request
                st = request(IFNAME, {"cmd": "status"}).get("status", {})
                report["udrv_status"] = {k: st.get(k) for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped",
                                                                 "recoveries", "escalations", "restarts")}
            finally:
                udrv.send_signal(signal.SIGTERM)
                try:
                    report["udrv_rc"] = udrv.wait(20)
                except subprocess.TimeoutExpired:
                    udrv.kill()
                log.close()

        try:
            modprobe("pegasus")
            for n in range(1, rounds + 1):
                kernel_phase(n)
                udrv_phase(n)
            if rounds > 1:
                kernel_phase(rounds + 1)        # the kernel's runs bracket udrv's
        finally:
            server.terminate()
            server.wait(5)
        report["gadget"] = rig.counters()["ffs"]
        report["pump"] = rig.counters().get("pump")        # the C data path's counters (None: Python path)
        report["model"] = {k: v for k, v in rig.counters()["model"].items()
                           if k in ("tx_frames", "rx_frames", "rx_lost", "tx_missing_pad")}
    out.write_text(json.dumps(report, indent=1))
    return 0


# --- host side -------------------------------------------------------------------------------------

def ratios(runs: list[dict]) -> dict[str, float]:
    """udrv / pegasus.ko per direction, of the medians of each side's runs."""
    ok = [r for r in runs if "error" not in r]
    out = {}
    for d in sorted({r["direction"] for r in ok}):
        k = [r["mbit_s"] for r in ok if (r["path"], r["direction"]) == ("pegasus.ko", d)]
        u = [r["mbit_s"] for r in ok if (r["path"], r["direction"]) == ("udrv", d)]
        if k and u and statistics.median(k):
            out[d] = round(statistics.median(u) / statistics.median(k), 2)
    return out


def table(rep: dict) -> str:
    rows = ["path        direction          rate         retr/lost  gadget-cpu  udrv-cpu  guest-busy  tcp-rtt",
            "----------  -----------------  -----------  ---------  ----------  --------  ----------  --------"]
    for r in rep["runs"]:
        if "error" in r:
            rows.append(f"{r['path']:<10}  {r['direction']:<17}  failed: {r['error'].splitlines()[-1][:60]}")
            continue
        unit = "fr/s" if r["direction"].startswith("UDP") else "Mbit/s"
        rows.append(f"{r['path']:<10}  {r['direction']:<17}  {r['mbit_s']:6.1f} {unit:<6} {str(r['retransmits']):>9}  "
                    f"{r['gadget_cpu']:10.2f}  {str(r['udrv_cpu'] if r['udrv_cpu'] is not None else '-'):>8}  "
                    f"{r['guest_busy']:10.2f}  "
                    + (f"{r['tcp_rtt_ms']:5.1f} ms" if r.get("tcp_rtt_ms") is not None else "       -"))
    rows.append("udrv / pegasus.ko: " + ", ".join(f"{d} {x:.2f}" for d, x in ratios(rep["runs"]).items()))
    rows.append("(cpu = CPU seconds per wall second of that process, all threads; 1.0 = one vCPU)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_usb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per run (default 5)")
    ap.add_argument("--smp", type=int, default=2, help="guest vCPUs (default 2)")
    ap.add_argument("--udp-pps", type=int, default=3000,
                    help="also offer this many 60-byte UDP frames/s each way and count what arrives (0: skip)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="pegasus.ko then udrv, this many times, then pegasus.ko again (medians; default 2)")
    ap.add_argument("--json", action="store_true", help="print the raw report")
    ap.add_argument("--in-guest", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.in_guest:
        return in_guest(Path(a.in_guest), a.seconds, a.udp_pps, a.rounds)
    from ..testbed.guest import GuestDevices, GuestError, real_python, run
    from .sidebyside import GUEST_ENV, REPO
    tmp = Path(tempfile.mkdtemp(prefix="bench-usb."))
    try:
        res = run([real_python(), "-m", "udrv.bench.pegasus", "--in-guest", str(tmp / "r.json"),
                   "--seconds", str(a.seconds), "--udp-pps", str(a.udp_pps), "--rounds", str(a.rounds)],
                  GuestDevices(smp=a.smp), timeout=(12 * a.seconds + 120) * (2 * a.rounds + 1),
                  cwd=REPO, out_dir=tmp, env=GUEST_ENV)
    except GuestError as e:
        print(f"bench_usb: {e}", file=sys.stderr)
        return 2
    if not (tmp / "r.json").exists():
        print(f"bench_usb: the guest wrote no report (exit {res.returncode}):\n{res.output[-3000:]}", file=sys.stderr)
        return 1
    rep = json.loads((tmp / "r.json").read_text())
    rep["guest_seconds"] = round(res.seconds, 1)
    print(json.dumps(rep, indent=1) if a.json else table(rep))
    print(f"[guest: {res.seconds:.1f} s, smp {a.smp}, report in {tmp}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
