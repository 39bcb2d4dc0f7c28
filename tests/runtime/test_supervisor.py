"""The driver domain as a user meets it: `udrv run` is a supervisor, a worker and a warm spare;
every way a worker can end is survived with the interface kept, frames counted at the peer.
Needs root (a real TAP, a peer namespace)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import peerwait

from udrv import lifelock
from udrv.bench.seqsink import SeqSender
from udrv.control import request
from udrv.peer import PeerConfig

pytestmark = pytest.mark.root

IFNAME = f"udrvs{os.getpid() % 100000}"
PEER_CFG = PeerConfig.for_interface(IFNAME)
PEER = PEER_CFG.peer_addr
RUN_DIR = "/tmp/udrv-test-run"
NETNS = ["ip", "netns", "exec", PEER_CFG.netns]


# a death is seen by the worker's life lock as it begins to exit, or by its pidfd once it has
# (first on a loaded host, when the watch thread waits for the interpreter lock longer than
# the exit takes): either is a death seen; test_a_hundred_failovers_leak_nothing counts them
DEATH = ("life-lock", "pidfd") if lifelock.available() else ("pidfd",)


def status():
    r = request(IFNAME, {"cmd": "status"})
    assert r["ok"], r
    return r["status"]


def ifindex():
    with open(f"/sys/class/net/{IFNAME}/ifindex") as f:
        return int(f.read())


def carrier():
    with open(f"/sys/class/net/{IFNAME}/carrier") as f:
        return f.read().strip() == "1"


def echo_ok(n=10, timeout=3.0) -> int:
    return peerwait.echo_ok(PEER, n, timeout)


def wait_for(pred, timeout=10.0, what="condition"):
    peerwait.wait_for(pred, timeout, what, period=0.05)


def spare_ready():
    st = status()
    return st["spare"] is not None and st["spare"]["state"] == "idle" and st["worker"]["state"] == "running"


class Daemon:
    def __init__(self, proc):
        self.proc = proc
        self.output = ""


def run_daemon(*args, env=None):
    env = dict(os.environ, UDRV_RUN_DIR=RUN_DIR, **(env or {}))
    os.environ["UDRV_RUN_DIR"] = RUN_DIR
    p = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", *args, "--ifname", IFNAME, "--duration", "240"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    echo = None
    try:
        wait_for(lambda: os.path.exists(f"{RUN_DIR}/{IFNAME}.sock"), 20, "the control socket")
        wait_for(lambda: subprocess.run([*NETNS, "true"]).returncode == 0, 10, "netns")
        echo = subprocess.Popen([*NETNS, sys.executable, "-m", "udrv.bench.echo"])
        wait_for(lambda: echo_ok(3, 1.0) > 0, 15, "UDP echoes across the NIC")
        wait_for(spare_ready, 20, "a warm spare")
        yield p
    finally:
        if echo:
            echo.kill()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        print(p.stdout.read())


@pytest.fixture
def daemon():
    yield from run_daemon()


@pytest.fixture(params=["pegasus", "cdc_ecm", "e1000"])
def model(request):
    for p in run_daemon(f"model:{request.param}"):
        yield request.param, p


def inject_worker(kind):
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "inject", "--ifname", IFNAME, "worker", kind],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r


def failover_after(before: int, timeout=10.0):
    wait_for(lambda: status()["failovers"] > before and status()["last_failover"]["failover_ms"] is not None,
             timeout, "a failover")
    return status()["last_failover"]


@pytest.mark.parametrize("kind,cause,detected_by", [
    ("kill", "killed by SIGKILL", DEATH),
    ("segv", "killed by SIGSEGV", DEATH),
    ("exit", "exited with status 70", DEATH),
    ("stop", "froze", ("heartbeat",)),
    ("spin", "froze", ("heartbeat",)),
    ("hang", "froze", ("heartbeat",)),
])
def test_every_way_a_worker_ends_is_a_failover_that_keeps_the_interface(daemon, kind, cause, detected_by):
    """With sequence-numbered frames flowing, the worker dies or freezes: the spare takes the
    device over from the checkpoint, the peer keeps receiving, nothing the host sent is lost,
    the interface keeps its ifindex, and a new spare is ready afterwards."""
    idx, st = ifindex(), status()
    old_worker, old_spare, n = st["worker"]["pid"], st["spare"]["pid"], st["failovers"]
    seq = SeqSender(PEER, NETNS)
    seq.start()
    time.sleep(0.3)
    inject_worker(kind)
    f = failover_after(n)
    time.sleep(0.3)
    count = seq.finish()
    assert f["pid"] == old_worker and f["successor"] == old_spare and f["spare_ready"]
    assert f["cause"].startswith(cause) and f["detected_by"] in detected_by
    assert f["how"] == "restored from the checkpoint"
    assert count.lost == 0, count
    assert ifindex() == idx and status()["ifindex"] == idx
    assert echo_ok(10) >= 8
    wait_for(spare_ready, 20, "a new warm spare")
    st = status()
    assert st["worker"]["pid"] == old_spare and st["spare"]["pid"] not in (old_worker, old_spare)
    try:
        os.kill(old_worker, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the failed worker is still there"


def test_each_embedded_model_survives_a_worker_kill_under_traffic(model):
    name, _p = model
    idx, n = ifindex(), status()["failovers"]
    seq = SeqSender(PEER, NETNS)
    seq.start()
    time.sleep(0.3)
    inject_worker("kill")
    f = failover_after(n)
    time.sleep(0.3)
    count = seq.finish()
    assert count.lost == 0, count
    assert f["detected_by"] in DEATH and f["silent_ms"] is not None
    assert ifindex() == idx and echo_ok(10) >= 8
    assert status()["driver"] == name


def test_a_failover_without_a_ready_spare_starts_a_worker_cold(daemon):
    st = status()
    n = st["failovers"]
    os.kill(st["spare"]["pid"], signal.SIGKILL)
    wait_for(lambda: status()["spare"] is None or status()["spare"]["pid"] != st["spare"]["pid"], 5, "spare gone")
    # the spare that replaces it needs a moment to start: kill the worker before it is ready
    st2 = status()
    if st2["spare"] is not None and st2["spare"]["state"] == "idle":
        pytest.skip("the replacement spare was ready before the worker could be killed")
    os.kill(st["worker"]["pid"], signal.SIGKILL)
    f = failover_after(n, timeout=20)
    assert not f["spare_ready"] and f["how"]
    assert echo_ok(10) >= 8
    wait_for(spare_ready, 20, "a warm spare again")


def test_status_names_worker_and_spare_and_in_process_has_neither(daemon):
    st = status()
    assert st["worker"]["pid"] > 0 and st["worker"]["implementation"] and st["worker"]["state"] == "running"
    assert st["spare"]["pid"] > 0 and st["spare"]["state"] == "idle"
    assert st["supervisor"]["pid"] == daemon.pid
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "status", "--ifname", IFNAME, "--json"],
                       capture_output=True, text=True, timeout=30)
    assert json.loads(r.stdout)["worker"]["pid"] == st["worker"]["pid"]
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "status", "--ifname", IFNAME],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert f"worker {st['worker']['pid']} ({st['worker']['implementation']}, running)" in r.stdout, r.stdout
    assert f"spare {st['spare']['pid']}" in r.stdout


def test_in_process_flag_keeps_one_process():
    for p in run_daemon_in_process():
        st = status()
        assert "worker" not in st and st["state"] == "up"


def run_daemon_in_process():
    env = dict(os.environ, UDRV_RUN_DIR=RUN_DIR)
    os.environ["UDRV_RUN_DIR"] = RUN_DIR
    p = subprocess.Popen([sys.executable, "-m", "udrv.cli", "run", "--in-process", "--ifname", IFNAME,
                          "--duration", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: os.path.exists(f"{RUN_DIR}/{IFNAME}.sock") and status()["state"] == "up", 20, "the daemon")
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)


def test_a_crash_loop_backs_off_then_gives_up_with_the_interface_kept():
    """Every worker is killed as soon as it runs: the supervisor backs off, then stops trying,
    keeps the interface with its carrier off, says why, and does not eat a CPU."""
    for p in run_daemon("--give-up-after", "4"):
        idx = ifindex()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            st = status()
            if st["supervisor"]["gave_up"]:
                break
            w = st["worker"]
            if w is not None:
                try:
                    os.kill(w["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        st = status()
        assert st["supervisor"]["gave_up"] and "restart udrv" in st["supervisor"]["gave_up"]
        assert st["state"] == "failed" and st["worker"] is None and st["spare"] is None
        assert ifindex() == idx and not carrier()
        r = subprocess.run([sys.executable, "-m", "udrv.cli", "status", "--ifname", IFNAME],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "no worker runs the driver" in r.stdout and "restart udrv" in r.stdout, r
        assert "worker: none, spare: none" in r.stdout, r.stdout
        t0 = _cpu_seconds(p.pid)
        time.sleep(1.0)
        assert _cpu_seconds(p.pid) - t0 < 0.2, "the supervisor spins after giving up"


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_repeated_failures_swap_to_the_other_implementation_and_back():
    """e1000's C ring fails three times: the next worker runs the Python ring; after a quiet
    period the spare is the C ring again and the next failover brings it back."""
    for _p in run_daemon("model:e1000", "--swap-after", "3", "--swap-back-after", "2"):
        first = status()["worker"]["implementation"]
        assert first == "E1000Native"
        for _ in range(3):
            n = status()["failovers"]
            inject_worker("kill")
            failover_after(n)
            wait_for(spare_ready, 20, "a warm spare")
        st = status()
        assert st["worker"]["implementation"] == "E1000", st["worker"]
        wait_for(lambda: status()["spare"]["implementation"] == "E1000Native" and spare_ready(), 20,
                 "the preferred implementation as the spare")
        n = status()["failovers"]
        inject_worker("kill")
        failover_after(n)
        assert status()["worker"]["implementation"] == "E1000Native"
        assert echo_ok(10) >= 8


def test_an_embedded_usb_model_swaps_to_stop_and_wait_and_frames_still_flow():
    """pegasus on its model has two implementations too: the Python engine fails three times,
    the next worker runs stop-and-wait, and sequence-numbered frames still all reach the peer."""
    for _p in run_daemon("model:pegasus", "--swap-after", "3"):
        assert status()["worker"]["implementation"] == "Pegasus"
        for _ in range(3):
            n = status()["failovers"]
            inject_worker("kill")
            failover_after(n)
            wait_for(spare_ready, 20, "a warm spare")
        assert status()["worker"]["implementation"] == "PegasusStopAndWait"
        seq = SeqSender(PEER, NETNS)
        seq.start()
        time.sleep(1.0)
        count = seq.finish()
        assert count.sent > 500 and count.lost == 0, count
        assert echo_ok(10) >= 8


def test_a_hundred_failovers_leak_nothing(daemon):
    """After 100 failovers the supervisor and the device process hold the fds they held before
    (memfds, device connections, pidfds), the supervisor has as many children, none a zombie."""
    wait_for(spare_ready, 20, "a warm spare")
    sup = daemon.pid
    devhost = next(k for k in _children(sup) if b"udrv.devicehost" in open(f"/proc/{k}/cmdline", "rb").read())
    fds0, kids0, dev0 = _fds(sup), _children(sup), _fds(devhost)
    seen_by = []
    for _ in range(100):
        n = status()["failovers"]
        inject_worker("kill")
        seen_by.append(failover_after(n)["detected_by"])
        wait_for(spare_ready, 20, "a warm spare")
        time.sleep(0.3)              # a worker killed at once after it came up would count as a crash loop
    assert echo_ok(10) >= 8
    assert status()["failovers"] >= 100
    if lifelock.available():         # the life lock tells most deaths (the pidfd the odd one it wins)
        assert seen_by.count("life-lock") >= 80, seen_by
    assert _fds(sup) == fds0
    assert _fds(devhost) == dev0
    kids = _children(sup)
    assert len(kids) == len(kids0) and not [k for k, state in kids.items() if state == "Z"]


def _fds(pid):
    """The supervisor's open fds at rest: the control connection of the last status() call may
    still be closing on its side, so the count settles first."""
    time.sleep(0.2)
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid):
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out[int(d)] = fields[0]
    return out


def test_the_worker_and_the_spare_run_unprivileged(daemon):
    """Both run as an unprivileged user with no capabilities and no_new_privs."""
    st = status()
    for pid in (st["worker"]["pid"], st["spare"]["pid"]):
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        assert fields["Uid"].split()[0] != "0", fields["Uid"]
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        assert fields["NoNewPrivs"].strip() == "1"
    assert echo_ok(10) >= 8           # and the datapath works that way


def test_a_confined_process_opens_no_device_node():
    """What drop_privileges() leaves a worker: no usbfs node, no VFIO, no /dev/net/tun (each
    exists on the host or is made here for the check), while files stay readable."""
    code = r"""
import glob, os, sys
from udrv.sandbox import drop_privileges
paths = glob.glob("/dev/bus/usb/*/*") + glob.glob("/dev/vfio/*") + ["/dev/net/tun"]
print(drop_privileges(), file=sys.stderr)
opened = []
for p in paths:
    try:
        os.close(os.open(p, os.O_RDWR))
        opened.append(p)
    except OSError:
        pass
try:
    os.close(os.open(p, os.O_RDONLY))
    opened.append(p + " (read-only)")
except OSError:
    pass
with open("/etc/hostname") as f:
    f.read()
print("opened:" + ",".join(opened))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr
    assert "uid=65534" in r.stderr and "landlock=on" in r.stderr
    assert r.stdout.strip() == "opened:", r.stdout


@pytest.mark.parametrize("device, says", [
    ("usb:1234:5678", "no USB device 1234:5678 is plugged in"),
    ("usb:zz", "names no USB device: use usb:VID:PID"),
    ("pci:zz", "is not a PCI address"),
    ("pci:0000:00:1f.6", "no PCI device 0000:00:1f.6"),
])
def test_a_real_device_that_cannot_be_had_is_one_sentence_and_leaves_no_interface(device, says):
    """The supervisor opens real devices itself (a usbfs node per worker, the VFIO container):
    one that is missing or misnamed stops `udrv run` before any worker starts, with what to do."""
    name = f"udrvx{os.getpid() % 10000}"
    cp = subprocess.run([sys.executable, "-m", "udrv.cli", "run", device, "--ifname", name, "--duration", "1"],
                        capture_output=True, text=True, timeout=60, env={**os.environ, "UDRV_RUN_DIR": RUN_DIR})
    assert cp.returncode == 1, cp
    last = cp.stderr.strip().splitlines()[-1]
    assert last.startswith("udrv: ") and says in last, cp.stderr
    assert "Traceback" not in cp.stderr and "udrv.worker" not in cp.stderr, cp.stderr
    assert not os.path.exists(f"/sys/class/net/{name}")
