"""The supervised daemon as a user runs it: a real TAP, the embedded device, a peer namespace,
`udrv status` / `udrv inject` over the control socket, clean shutdown. Needs root."""
import json
import os
import signal
import subprocess
import sys

import pytest

import peerwait

from udrv.peer import PeerConfig

pytestmark = pytest.mark.root

IFNAME = f"udrvt{os.getpid() % 100000}"   # unique: test runs may overlap on one machine
PEER_CFG = PeerConfig.for_interface(IFNAME)
PEER = PEER_CFG.peer_addr


def udrv(*args, check=True):
    return subprocess.run([sys.executable, "-m", "udrv.cli", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def status():
    return json.loads(udrv("status", "--ifname", IFNAME, "--json").stdout)


def ifindex():
    with open(f"/sys/class/net/{IFNAME}/ifindex") as f:
        return int(f.read())


def echo_ok(n=20, timeout=2.0) -> int:
    return peerwait.echo_ok(PEER, n, timeout)


def wait_for(pred, timeout=10.0, what="condition"):
    peerwait.wait_for(pred, timeout, what, period=0.1)


@pytest.fixture
def daemon():
    yield from _daemon()


@pytest.fixture(params=["e1000", "cdc_ecm"])
def embedded(request):
    """`udrv run model:X`: the other drivers on their own embedded device models."""
    for p in _daemon(f"model:{request.param}"):
        yield request.param, p


def _daemon(*device: str):
    env = dict(os.environ, UDRV_RUN_DIR="/tmp/udrv-test-run")
    os.environ["UDRV_RUN_DIR"] = env["UDRV_RUN_DIR"]
    p = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", *device, "--ifname", IFNAME, "--duration", "120"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    echo = None
    try:
        wait_for(lambda: os.path.exists(f"/tmp/udrv-test-run/{IFNAME}.sock"), 20, "the control socket")
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", PEER_CFG.netns, "true"]).returncode == 0, 5, "netns")
        echo = subprocess.Popen(["ip", "netns", "exec", PEER_CFG.netns, sys.executable, "-m", "udrv.bench.echo"])
        wait_for(lambda: echo_ok(3, 1.0) > 0, 10, "UDP echoes across the NIC")
        yield p
    finally:
        if echo:
            echo.kill()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        print(p.stdout.read())


def test_traffic_status_inject_and_config_mirroring(daemon):
    st = status()
    assert st["state"] == "up" and st["link"]["up"] and st["driver"] == "pegasus"
    idx = ifindex()
    assert echo_ok(20) >= 18
    st = status()
    assert st["rx_packets"] >= 18 and st["tx_packets"] >= 18

    # a fault injected into each kind of entry point: the interface stays, traffic continues
    for entry, kind in (("xmit", "raise"), ("poll", "stall"), ("link_check", "hang")):
        udrv("inject", "--ifname", IFNAME, entry, kind)
        wait_for(lambda: any(r["entry"] == entry for r in status()["recent_recoveries"]), 10,
                 f"a recovery of {entry}")
        assert echo_ok(10) >= 8
    st = status()
    assert st["recoveries"] >= 3 and st["escalations"] == 0
    assert ifindex() == idx                               # invariant 1: same interface
    assert st["last_fault"]

    # what the host configures is mirrored into the driver
    subprocess.run(["ip", "link", "set", IFNAME, "promisc", "on"], check=True)
    wait_for(lambda: status()["rx_mode"]["promisc"], 5, "promiscuous mode in the driver")
    subprocess.run(["ip", "link", "set", IFNAME, "mtu", "1400"], check=True)
    wait_for(lambda: status()["mtu"] == 1400, 5, "MTU 1400 in the driver")
    subprocess.run(["ip", "link", "set", IFNAME, "mtu", "9000"], check=True)   # beyond the chip
    wait_for(lambda: open(f"/sys/class/net/{IFNAME}/mtu").read().strip() == "1400", 5,
             "the refused MTU to be reverted on the interface")
    subprocess.run(["ip", "link", "set", IFNAME, "address", "02:12:34:56:78:9a"], check=True)
    wait_for(lambda: status()["mac"] == "02:12:34:56:78:9a", 5, "the new MAC in the driver")
    subprocess.run(["ip", "neigh", "flush", "dev", IFNAME], check=False)
    assert echo_ok(10, 4.0) >= 8                          # the peer learns the new MAC and answers


def test_embedded_models_of_the_other_drivers_carry_traffic_and_recover(embedded):
    driver, _ = embedded
    st = status()
    assert st["state"] == "up" and st["link"]["up"] and st["driver"] == driver
    idx = ifindex()
    assert echo_ok(20) >= 18
    for entry, kind in (("xmit", "raise"), ("poll", "stall")):
        udrv("inject", "--ifname", IFNAME, entry, kind)
        wait_for(lambda: any(r["entry"] == entry for r in status()["recent_recoveries"]), 10,
                 f"a recovery of {entry}")
        assert echo_ok(10) >= 8
    st = status()
    assert [r["outcome"] for r in st["recent_recoveries"]] == ["recovered", "recovered"], st["recent_recoveries"]
    assert st["escalations"] == 0 and ifindex() == idx


def test_an_unknown_embedded_model_is_named_with_the_ones_there_are():
    r = udrv("run", "model:rtl8139", "--ifname", IFNAME, check=False)
    assert r.returncode == 1
    assert "no embedded model called 'rtl8139'" in r.stderr and "model:cdc_ecm" in r.stderr


def test_clean_shutdown(daemon):
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not os.path.exists(f"/sys/class/net/{IFNAME}")
    assert not os.path.exists(f"/tmp/udrv-test-run/{IFNAME}.sock")
    assert subprocess.run(["ip", "netns", "exec", PEER_CFG.netns, "true"], capture_output=True).returncode != 0


def test_status_without_daemon_says_what_to_do():
    r = udrv("status", "--ifname", "nosuch0", check=False)
    assert r.returncode == 1
    assert "no udrv daemon is running for nosuch0" in r.stderr and "udrv run" in r.stderr


def test_demo_keeps_iperf3_flowing_through_faults():
    """The README's main command: iperf3 through the embedded device with faults mid-run."""
    import shutil
    if shutil.which("iperf3") is None:
        pytest.fail("iperf3 is not installed: apt-get install iperf3 (CI installs it)")
    env = dict(os.environ, UDRV_RUN_DIR="/tmp/udrv-test-demo")
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "demo", "--seconds", "4", "--ifname", f"udrvd{os.getpid() % 100000}"],
                       capture_output=True, text=True, timeout=90, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "PASS" in out
    assert "recovered xmit from exception" in out
    assert "recovered poll from stall" in out
    assert "recovered set_rx_mode from exception" in out
    assert "iperf3:" in out and "Mbit/s" in out


def test_unplug_keeps_the_interface_and_replug_resumes(daemon):
    idx = ifindex()
    udrv("inject", "--ifname", IFNAME, "device", "unplug")
    wait_for(lambda: status()["state"] == "down", 5, "state down after the unplug")
    assert ifindex() == idx                                   # the interface stays
    assert open(f"/sys/class/net/{IFNAME}/carrier").read().strip() == "0"
    assert "gone" in status()["last_fault"]
    udrv("inject", "--ifname", IFNAME, "device", "replug")
    wait_for(lambda: status()["state"] == "up", 5, "state up after the replug")
    wait_for(lambda: open(f"/sys/class/net/{IFNAME}/carrier").read().strip() == "1", 5, "carrier back")
    assert ifindex() == idx
    assert echo_ok(10, 4.0) >= 8


def test_malformed_frames_over_the_control_socket_are_counted(daemon):
    for kind in ("crc_error", "length_beyond_transfer", "truncated"):
        udrv("inject", "--ifname", IFNAME, "device", f"garbage:{kind}")
    wait_for(lambda: sum(status()["rx_dropped"].values()) == 3, 5, "three drops counted")
    st = status()
    assert st["rx_dropped"] == {"crc_error": 1, "length_beyond_transfer": 1, "truncated": 1}
    assert st["state"] == "up" and echo_ok(5) >= 4


def test_recovery_bench_reports_each_driver_checkpoint_against_restart():
    """`udrv bench recovery` on one embedded driver, two injections of one fault: a table with
    both recovery modes, and the 1 ms probe kept getting answers through them."""
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "bench", "recovery", "--driver", "e1000", "--repeats", "2",
                        "--fault", "xmit:raise", "--ifname", IFNAME], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "### e1000" in out and "### pegasus" not in out
    row = next(line for line in out.splitlines() if line.startswith("| xmit:raise |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and all(c.endswith(" ms") for c in cells[2:6]), row
    lost = next(line for line in out.splitlines() if line.startswith("probe packets lost"))
    import re
    (ck_lost, ck_sent), (rs_lost, rs_sent) = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+)", lost)]
    assert ck_sent > 1000 and rs_sent > 1000
    assert ck_lost < ck_sent * 0.02 and rs_lost < rs_sent * 0.02, lost


def test_aqm_settings_are_shown_and_changed_live(daemon):
    """CoDel on the TX queue: on by default (fq_codel's 5 ms / 100 ms, ECN), changed and turned
    off on a running daemon with `udrv aqm`, refused with the reason when nonsensical."""
    j = status()["tx_journal"]
    assert (j["aqm_target_ms"], j["aqm_interval_ms"], j["aqm_ecn"]) == (5.0, 100.0, True)
    assert "aqm: codel target 5 ms interval 100 ms:" in udrv("status", "--ifname", IFNAME).stdout
    out = udrv("aqm", "--ifname", IFNAME, "--target", "2", "--interval", "40", "--ecn", "off").stdout
    assert out.strip() == f"{IFNAME}: aqm codel target 2 ms interval 40 ms drop only"
    j = status()["tx_journal"]
    assert (j["aqm_target_ms"], j["aqm_interval_ms"], j["aqm_ecn"]) == (2.0, 40.0, False)
    bad = udrv("aqm", "--ifname", IFNAME, "--target", "-1", check=False)
    assert bad.returncode == 1 and "target" in bad.stderr
    assert udrv("aqm", "--ifname", IFNAME, "--target", "0").stdout.strip() == f"{IFNAME}: aqm off"
    assert "aqm: off" in udrv("status", "--ifname", IFNAME).stdout
    assert echo_ok(10) >= 8
