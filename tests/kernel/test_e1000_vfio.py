"""Kernel tier: udrv's e1000 driver on QEMU's e1000 (82540EM) and e1000e (82574L) through vfio-pci.

One guest boot per device model. The guest side is this file run as a script inside the guest
(`python3 tests/kernel/test_e1000_vfio.py MODEL HOST_IP GUEST_IP OUT`); it writes a JSON report
that the tests below check:

  the kernel's e1000/e1000e owns the NIC -> `udrv bind BDF` (CLI) -> `udrv list` shows it on
  vfio-pci -> `python3 -m udrv.cli run pci:BDF --ifname udrv0` in the background -> UDP echo to
  the peer (QEMU's host TAP, in a host network namespace with `udrv.bench.echo`: udrv.bench.sidebyside.HostPeer)
  -> faults injected mid-traffic (xmit raise, poll stall, set_rx_mode raise via
  `ip link set udrv0 promisc on`, link_check hang) -> recovered, same ifindex, traffic goes on,
  no DMAR fault in the guest log -> SIGTERM removes udrv0 -> `udrv unbind BDF` gives the NIC back
  to the kernel driver, whose netdev comes back and carries traffic again.

Two vCPUs: with one, the daemon's 1 ms ring polling and the scenario's interpreters share the
CPU and every CLI call costs several seconds under TCG. ~35-45 s per boot.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from udrv.bench.echo import Flood, faults_under_flood, roundtrips as echo
from udrv.bench.sidebyside import (KERNEL_DRIVER, MODEL_IDS, dmar_faults, echo_once, find_bdf, kernel_netdev, sh,
                                   wait_for)

IFNAME = "udrv0"
# Each interpreter the scenario starts (udrv bind/list/run/inject/unbind) would otherwise compile
# udrv from source again under TCG: let them write .pyc files (into the guest's tmpfs overlay).
GUEST_ENV = {"PYTHONDONTWRITEBYTECODE": ""}
DURATION = 300            # udrv run --duration: a forgotten daemon still ends
FAULTS = (("xmit", "raise"), ("poll", "stall"), ("set_rx_mode", "raise"), ("link_check", "hang"))


# =============================================================================================
# guest side (runs inside the QEMU guest as root)
# =============================================================================================

def udrv(*args: str) -> str:
    return sh(sys.executable, "-m", "udrv.cli", *args, timeout=90)


def udrv_bg(*args: str) -> subprocess.Popen:
    """A udrv CLI command in the background: with two vCPUs its interpreter start (seconds
    under TCG) overlaps the scenario's other work."""
    return subprocess.Popen([sys.executable, "-m", "udrv.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def collect(p: subprocess.Popen, timeout: float = 90) -> str:
    """stdout of a udrv_bg command (stderr only in the error)."""
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, p.args[2:]))} exited with {p.returncode}: {(err or out).strip()}")
    return out


def udrv_status() -> dict:
    """`udrv status --json`, asked over the control socket without a second interpreter."""
    from udrv.control import request
    r = request(IFNAME, {"cmd": "status"}, timeout=10.0)
    if not r.get("ok"):
        raise RuntimeError(f"udrv status: {r.get('error')}")
    return r["status"]


def driver_of(bdf: str) -> str | None:
    link = Path(f"/sys/bus/pci/devices/{bdf}/driver")
    return os.path.basename(os.readlink(link)) if link.exists() else None


def inject_faults(report: dict, peer_ip: str) -> None:
    from udrv.control import request

    def inject(i: int, entry: str, kind: str) -> None:
        if i == 0:
            udrv("inject", entry, kind, "--ifname", IFNAME)          # the command a user types
        else:                                                        # the same request, no new interpreter
            r = request(IFNAME, {"cmd": "inject", "entry": entry, "kind": kind, "count": 1})
            assert r.get("ok"), r
        if entry == "set_rx_mode":                # the daemon mirrors the host's flags within 0.25 s
            sh("ip", "link", "set", IFNAME, "promisc", "on")

    # link_check runs once a second and its hang lasts its 0.25 s deadline
    report["faults"] = faults_under_flood(IFNAME, peer_ip, FAULTS, inject,
                                          settle=lambda entry: 2.5 if entry == "link_check" else 0.8)


def failovers_under_echo(peer_ip: str) -> dict:
    """The worker killed, then crashed in C, under echo traffic: each time the warm spare (its
    own dup of the device fd, DMA memory from the supervisor) takes the running device over
    from the checkpoint. Counts the echoes at this end, and the IOMMU mappings left."""
    from udrv.testbed.failovers import worker_failovers
    ifindex = Path(f"/sys/class/net/{IFNAME}/ifindex").read_text().strip()
    flood = Flood(peer_ip, interval=0.01)
    flood.start()
    time.sleep(1.0)
    try:
        out = worker_failovers(IFNAME, ("kill", "segv"))
    finally:
        flood.halt.set()
        flood.join(10)
    return {"failovers": out, "flood_sent": flood.sent, "flood_back": flood.got,
            "ifindex_same": Path(f"/sys/class/net/{IFNAME}/ifindex").read_text().strip() == ifindex,
            "device": udrv_status()["supervisor"]["device"], "echo_after": echo(peer_ip, [100, 1472] * 5)}


class Report(dict):
    """The scenario's JSON report; `stage` changes also record when they happened."""

    def __init__(self) -> None:
        super().__init__(stage="setup", stage_at={})
        self.t0 = time.monotonic()

    def __setitem__(self, key: str, value) -> None:
        if key == "stage":
            self["stage_at"][value] = round(time.monotonic() - self.t0, 1)
        super().__setitem__(key, value)


def guest_scenario(model: str, host_ip: str, guest_ip: str, out: Path) -> None:
    report = Report()
    kdrv = KERNEL_DRIVER[model]
    try:
        for mod in ("tun", "vfio-pci", kdrv):
            sh("modprobe", mod)
        bdf = find_bdf(MODEL_IDS[model])
        report["netdev_before"] = wait_for(lambda: kernel_netdev(bdf), 20, f"{kdrv} to register a netdev")
        report["kernel_driver_before"] = driver_of(bdf)

        report["stage"] = "bind"
        report["bind_output"] = udrv("bind", bdf).strip()
        report["driver_after_bind"] = driver_of(bdf)
        lister = udrv_bg("list")          # reads sysfs only: it may run while the daemon starts

        report["stage"] = "udrv start"
        t0 = time.monotonic()
        log = out.parent / f"udrv-{model}.log"
        p = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", f"pci:{bdf}", "--ifname", IFNAME,
                              "--duration", str(DURATION)], stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: p.poll() is None and os.path.exists(f"/run/udrv/{IFNAME}.sock")
                 and udrv_status()["state"] == "up", 60, "udrv run to bring the device up", 0.2)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        report["list_line"] = next((line.strip() for line in collect(lister).splitlines() if f"pci:{bdf}" in line), "")
        sh("ip", "addr", "add", f"{guest_ip}/24", "dev", IFNAME)
        wait_for(lambda: echo_once(host_ip), 30, "the peer's echo to answer through udrv0", 0.0)
        st0 = udrv_status()
        report["mac"], report["link"], report["implementation"] = st0["mac"], st0["link"], st0["implementation"]

        report["stage"] = "echo"
        sizes = [18, 100, 470, 1000, 1472] * 6
        report["echo_sent"], report["echo_back"] = len(sizes), echo(host_ip, sizes)
        status_cli = udrv_bg("status", "--json", "--ifname", IFNAME)   # what a user types; answered meanwhile

        report["stage"] = "faults"
        inject_faults(report, host_ip)
        st1 = json.loads(collect(status_cli))
        report["status_delta"] = {k: st1[k] - st0[k] for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}
        report["c_loop"] = st1.get("c_loop")
        report["echo_after_faults"] = echo(host_ip, [100, 1472] * 5)
        report["dmar_faults"] = dmar_faults()

        report["stage"] = "failover"
        report["failover"] = failovers_under_echo(host_ip)
        report["dmar_faults_after_failover"] = dmar_faults()

        report["stage"] = "stop"
        p.send_signal(signal.SIGTERM)
        try:
            report["udrv_exit"] = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            report["udrv_exit"] = -9
        report["udrv0_gone"] = not Path(f"/sys/class/net/{IFNAME}").exists()

        report["stage"] = "unbind"
        report["unbind_output"] = udrv("unbind", bdf).strip()
        report["kernel_driver_after"] = driver_of(bdf)
        netdev = wait_for(lambda: kernel_netdev(bdf), 20, f"{kdrv} to register its netdev again")
        report["netdev_after"] = netdev
        sh("ip", "addr", "add", f"{guest_ip}/24", "dev", netdev)
        sh("ip", "link", "set", netdev, "up")
        # the kernel driver's link comes up after its watchdog (~2-4 s under TCG)
        report["kernel_echo_after"] = bool(wait_for(lambda: echo_once(host_ip), 30,
                                                    f"the peer's echo through {kdrv}'s {netdev}", 0.0))
        report["stage"] = "done"
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        report.setdefault("dmar_faults", dmar_faults())
        out.write_text(json.dumps(report, indent=1))


# =============================================================================================
# host side (pytest)
# =============================================================================================

if __name__ == "__main__":   # the guest runs the scenario: importing pytest there costs seconds under TCG
    pytest = None
else:
    import pytest

if pytest is not None:
    from dataclasses import asdict

    pytestmark = pytest.mark.kernel

    @pytest.fixture(scope="module", params=["e1000", "e1000e"])
    def run(request, guest, tmp_path_factory):
        from udrv.testbed.guest import GuestDevices
        from udrv.bench.sidebyside import HostPeer, PeerPlan
        model = request.param
        if os.geteuid() != 0:
            pytest.skip("the e1000's peer is a host TAP in a network namespace: that needs root")
        tmp = tmp_path_factory.mktemp(model)
        out = tmp / "report.json"
        plan = PeerPlan.unique("e1ke" if model == "e1000e" else "e1k")
        with HostPeer(plan, iperf=False) as peer:
            res = guest.run([guest.python, str(Path(__file__).resolve()), model, plan.host_ip, plan.guest_ip,
                             str(out)], GuestDevices(tap_ifname=plan.tap, smp=2, **{model: True}),
                            timeout=240, out_dir=tmp, env=GUEST_ENV)
            counters = asdict(peer.counters()) if peer.ready.is_set() else None
            peer_error = peer.error
        if not out.exists():
            raise AssertionError(f"the guest wrote no report (exit {res.returncode}):\n{res.output[-3000:]}\n"
                                 f"console:\n{res.console[-2000:]}")
        report = json.loads(out.read_text())
        report.update(_model=model, _guest_seconds=round(res.seconds, 1), _peer=counters, _peer_error=peer_error)
        print(f"{model}: guest {res.seconds:.1f} s, stages at {report.get('stage_at')}")
        for log in tmp.glob("udrv-*.log"):
            report.setdefault("_logs", {})[log.name] = log.read_text()[-4000:]
        return report

    def _ok(r: dict) -> None:
        assert not r["_peer_error"], f"host peer: {r['_peer_error']}"
        assert "error" not in r, f"guest scenario failed at {r.get('stage')}: {r['error']}\n{r.get('_logs')}"

    def test_udrv_bind_moves_the_nic_from_the_kernel_driver_to_vfio_pci(run):
        _ok(run)
        kdrv = KERNEL_DRIVER[run["_model"]]
        assert run["kernel_driver_before"] == kdrv and run["netdev_before"]
        assert run["driver_after_bind"] == "vfio-pci", run["bind_output"]
        assert "driver vfio-pci" in run["list_line"] and run["list_line"].endswith("e1000"), run["list_line"]

    def test_traffic_both_ways_counted_at_the_peer(run):
        _ok(run)
        from udrv import fastpath
        assert run["implementation"] == ("E1000Native" if fastpath.available() else "E1000")
        assert run["mac"].startswith("52:54:00") and run["link"]["up"] and run["link"]["speed"] == 1000
        assert run["echo_back"] == run["echo_sent"], run
        d = run["status_delta"]
        assert d["tx_packets"] >= run["echo_sent"] and d["rx_packets"] >= run["echo_sent"], d
        assert d["tx_bytes"] > sum([18, 100, 470, 1000, 1472] * 6), d
        peer = run["_peer"]       # the TAP's own counters: its rx is what the guest sent
        assert peer["rx_packets"] >= run["echo_sent"] and peer["tx_packets"] >= run["echo_back"], peer
        if fastpath.available():    # the whole turn looped in C on vfio-pci (native/pci_loop.c)
            loop = run["c_loop"]
            assert loop and loop["rx"] >= run["echo_sent"] and loop["tap_in"] >= run["echo_sent"], loop
            assert loop["sleeps"] > 0 and loop["turns"] > loop["sleeps"], loop

    def test_faults_injected_mid_traffic_are_recovered(run):
        _ok(run)
        f = run["faults"]
        assert f["escalations"] == 0 and f["restarts"] == 0 and f["recoveries"] >= len(FAULTS), f
        recovered = {(e, fault) for e, fault, outcome in f["entries"] if outcome == "recovered"}
        assert {("xmit", "exception"), ("poll", "stall"), ("set_rx_mode", "exception"),
                ("link_check", "timeout")} <= recovered, f
        assert f["ifindex_same"] and f["promisc"], f
        assert f["flood_back"] > 0.8 * f["flood_sent"], f
        assert run["echo_after_faults"] == 10
        assert run["dmar_faults"] == [], run["dmar_faults"]

    def test_worker_failover_on_vfio_keeps_traffic_and_the_iommu_clean(run):
        """Kill and SIGSEGV of the worker mid-traffic on real vfio-pci: the spare takes over the
        running device from the checkpoint; no DMAR fault; a dead worker's DMA buffers are
        unmapped once its successor's rings are programmed, so the mappings do not grow."""
        _ok(run)
        from udrv.testbed.failovers import check_failovers
        f = run["failover"]
        check_failovers(f["failovers"], ("kill", "segv"))
        assert f["ifindex_same"] and f["echo_after"] == 10, f
        assert f["flood_back"] >= f["flood_sent"] - 2, f      # echoes lost both ways across two failovers
        assert run["dmar_faults_after_failover"] == [], run["dmar_faults_after_failover"]
        assert f["device"]["dma_buffers"] == f["device"]["dma_mappings"] > 0, f["device"]

    def test_sigterm_removes_udrv0_and_unbind_gives_the_nic_back(run):
        _ok(run)
        kdrv = KERNEL_DRIVER[run["_model"]]
        assert run["udrv_exit"] == 0 and run["udrv0_gone"]
        assert run["kernel_driver_after"] == kdrv, run["unbind_output"]
        assert run["netdev_after"] and run["kernel_echo_after"]


if __name__ == "__main__":
    guest_scenario(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))


# --- the side-by-side bench's report, from a made-up result (no guest; seconds) ---------------------

def _fake_bench_result() -> dict:
    def m(value: float, busy_s: float = 5.0, frames: int = 100_000, daemon: float = 0.0) -> dict:
        cpu = {"user_pct": 10.0, "system_pct": 40.0, "softirq_pct": 49.0, "idle_pct": 1.0, "irq_pct": 0.0,
               "busy_pct": 99.0, "busy_s": busy_s, "daemon_user_s": daemon, "daemon_sys_s": daemon / 2,
               "wall_s": 5.0, "frames": frames, "guest_us_per_frame": busy_s / frames * 1e6, "iperf3_cpu_pct": 50.0}
        if daemon:
            cpu["daemon_us_per_frame"] = 1.5 * daemon / frames * 1e6
        return {"value": value, "unit": "x", "all": [value], "cpu": cpu}
    kernel = {n: m(v) for n, v in (("tcp_tx", 500), ("tcp_rx", 400), ("udp64_tx", 20), ("udp64_rx", 20))}
    udrv_c = {n: m(v, daemon=3.0) for n, v in (("tcp_tx", 100), ("tcp_rx", 80), ("udp64_tx", 10), ("udp64_rx", 12))}
    from udrv.bench.sidebyside import summarize_collapsed
    prof = summarize_collapsed("process 1:\"python3\";main (udrv/cli.py:9);poll (udrv/nic.py:3) 30\n"
                               "process 1:\"python3\";main (udrv/cli.py:9);read_batch (udrv/tap.py:80) 10\n")
    udrv_c.update(_label="udrv C ring (E1000Native)", _profile={"tcp_tx": prof})
    gaps = {"promisc-toggle:none": [1000.0] * 3, "xmit:raise": [20.0, 30.0, 40.0], "link_check:hang": [1040.0] * 3}
    run = {"mode": "checkpoint", "impl": "c-only", "sent": 1000, "received": 990, "baseline_gap_ms": 12.0,
           "gaps_ms": gaps, "per_fault": {"xmit:raise": {"recovery_ms": [1.0], "silent_ms": [9.0], "outcomes": ["recovered"]}},
           "spacing_s": {"xmit:raise": 0.7}, "recoveries": 6, "escalations": 0, "restarts": 0, "swaps": 0,
           "implementation": "E1000Native", "ifindex": 3}
    restart = dict(run, mode="restart", gaps_ms={k: [v[0] * 40 for _ in v] for k, v in gaps.items()})
    return {"stage": "done", "config": {"model": "e1000", "seconds": 5.0, "rounds": 1},
            "cases": {"kernel": dict(kernel, _label="kernel e1000"), "udrv_c": udrv_c,
                      "kernel_after": dict({n: m(v["value"] * 1.2) for n, v in kernel.items()}, _label="again")},
            "recovery": [run, restart], "host": {"smp": 1, "guest_seconds": 300.0}}


def test_bench_report_has_ratios_profile_recovery_and_a_png(tmp_path):
    from udrv.bench import sidebyside
    result = _fake_bench_result()
    r = sidebyside.ratios(result)["udrv_c"]
    assert abs(r["tcp_tx"] - 100 / 550) < 1e-9          # against the mean of the two kernel runs
    md = sidebyside.render_report(result)
    assert "**0.182**" in md and "## Where the time goes" in md and "`poll (nic.py)`" in md
    assert "| xmit:raise | 3 | 30.0 | 40.0 | 800.0 | 800.0 | 96% |" in md
    sidebyside.write_png_bars(tmp_path / "plain.png", sidebyside.chart_panels(result))
    assert (tmp_path / "plain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
