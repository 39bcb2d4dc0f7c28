"""C framing vs Python framing, side by side in one run (ratios, not absolute numbers).

For each frame size (64 B and 1500 B by default) and framing, one "frame" is an encode_tx of a
frame plus a decode_rx of a received transfer holding a frame of the same size:

  python   udrv.framing.Framing.encode_tx + decode_rx, called from Python
  cffi     udrv.fastpath.NativeFraming (the C code called once per frame from Python)
  c-loop   the same C functions in a C loop (what the USB ring pays per frame: no Python at all)

    python3 -m udrv.bench.framing [--seconds 1.0] [--sizes 64,1500] [--framing pegasus|adm8513|raw]
                                  [--json]

With --usb-guest it also boots the kernel-tier QEMU guest and measures the whole datapath on a
real USB device: iperf3 (TCP, both directions) between a TAP and the kernel's f_ecm gadget
(usb0, in a second namespace) on dummy_hcd, driven by the C ring (NativeUsbRing), by the
pure-Python engine (UsbNetEngine), and by the kernel's own cdc_ether, in one boot (~1 min):

    python3 -m udrv.bench.framing --usb-guest [--iperf-seconds 3]
    (python3 tools/bench_native.py ... is the same)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .. import fastpath, usbring
from ..drivers.pegasus import FRAMING_ADM8513, FRAMING_TRAILER
from ..framing import Framing, Shape

FRAMINGS = {
    "pegasus": FRAMING_TRAILER,
    "adm8513": FRAMING_ADM8513,
    "raw": Framing(Shape.RAW, rx_transfer_size=1514, pad_rule=512),
}


def rx_transfer(fr: Framing, frame: bytes) -> bytes:
    """What the device would send for this frame under this framing."""
    n = len(frame)
    if fr.shape is Shape.TRAILER4:
        return frame + bytes(((n + 4) & 0xFF, (n + 4) >> 8, 0, 0))
    if fr.shape is Shape.HEADER2:
        return bytes((n & 0xFF, n >> 8)) + frame
    return frame


def rate(fn: Callable[[], None], seconds: float) -> float:
    """Frames per second of fn (one call = one frame), best of 3 slices."""
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        end = t0 + seconds / 3
        while True:
            for _ in range(200):
                fn()
            n += 200
            t = time.perf_counter()
            if t >= end:
                break
        best = max(best, n / (t - t0))
    return best


def c_loop_rate(nf: "fastpath.NativeFraming", frame: bytes, rx: bytes, seconds: float) -> float:
    ffi, lib = fastpath.ffi, fastpath.lib
    rxbuf = ffi.new("uint8_t[]", rx)
    iters = 10_000
    while True:               # grow until one run takes a measurable slice of the budget
        ns = lib.udrv_framing_bench(nf.cstruct, frame, len(frame), rxbuf, len(rx), iters)
        if ns > seconds * 1e9 / 6 or iters > 1 << 30:
            break
        iters *= 4
    best = min(lib.udrv_framing_bench(nf.cstruct, frame, len(frame), rxbuf, len(rx), iters)
               for _ in range(3))
    return iters / (best / 1e9)


def bench(framing_name: str, sizes: list[int], seconds: float) -> list[dict]:
    fr = FRAMINGS[framing_name]
    nf = fastpath.NativeFraming(fr)
    rows = []
    for size in sizes:
        frame = bytes((i * 7) & 0xFF for i in range(size))
        rx = rx_transfer(fr, frame)
        assert fr.decode_rx(rx) == (frame, "") == nf.decode_rx(rx)
        assert fr.encode_tx(frame) == nf.encode_tx(frame)
        py = rate(lambda: (fr.encode_tx(frame), fr.decode_rx(rx)), seconds)
        cffi = rate(lambda: (nf.encode_tx(frame), nf.decode_rx(rx)), seconds)
        cloop = c_loop_rate(nf, frame, rx, seconds)
        rows.append({"framing": framing_name, "size": size, "python_fps": py, "cffi_fps": cffi,
                     "c_loop_fps": cloop, "cffi_vs_python": cffi / py, "c_loop_vs_python": cloop / py})
    return rows


# --- the whole ring on a real USB device (kernel tier) ---------------------------------------------

GADGET_VID, GADGET_PID = 0x0525, 0xA4A2
PEER_NS, HOST_IP, PEER_IP = "ringbench", "10.79.0.1", "10.79.0.2"
REPORT_PREFIX = "BENCH-NATIVE-REPORT "


def _sh(*cmd: str, timeout: float = 60.0) -> str:
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(cp.stderr or cp.stdout).strip()}")
    return cp.stdout


def _iperf(seconds: float, reverse: bool) -> float:
    """Mbit/s of one TCP iperf3 run from this namespace to the peer (reverse: peer sends)."""
    for attempt in range(3):
        cp = subprocess.run(["iperf3", "-c", PEER_IP, "-t", str(seconds), "-J", *(["-R"] if reverse else [])],
                            capture_output=True, text=True, timeout=seconds + 60)
        try:
            return json.loads(cp.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        except (ValueError, KeyError):
            time.sleep(1.0)      # the server was not listening yet, or a run was refused: retry
    raise RuntimeError(f"iperf3 to {PEER_IP} failed 3 times: {(cp.stdout or cp.stderr)[-300:]}")


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole guest so far (/proc/stat)."""
    f = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def _measured(fn: Callable[[], float], frames: Callable[[], int] | None) -> dict[str, float]:
    """Run one iperf: Mbit/s, guest CPU busy %, and this process's CPU µs per frame."""
    b0, t0 = _cpu_busy()
    r0 = os.times()
    f0 = frames() if frames else 0
    mbit = fn()
    r1 = os.times()
    b1, t1 = _cpu_busy()
    out = {"mbit": mbit, "guest_cpu_busy_pct": 100 * (b1 - b0) / max(t1 - t0, 1)}
    if frames:
        n = frames() - f0
        cpu = (r1.user - r0.user) + (r1.system - r0.system)
        out["ring_process_us_per_frame"] = 1e6 * cpu / max(n, 1)
        out["frames"] = n
    return out


def _ping_ms(count: int = 20) -> float:
    """Average RTT to the peer through the path under test (busybox ping)."""
    res = subprocess.run(["busybox", "ping", "-c", str(count), "-i", "0.05", "-q", PEER_IP],
                         capture_output=True, text=True, timeout=60)
    line = [ln for ln in res.stdout.splitlines() if "min/avg/max" in ln]
    return float(line[0].split("=")[1].split("/")[1]) if line else float("nan")


def _iperf_both(seconds: float, frames: Callable[[], int] | None = None) -> dict[str, Any]:
    server = subprocess.Popen(["ip", "netns", "exec", PEER_NS, "iperf3", "-s"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        ping = _ping_ms()
        tx = _measured(lambda: _iperf(seconds, False), frames)
        rx = _measured(lambda: _iperf(seconds, True), frames)
        return {"tx_mbit": tx["mbit"], "rx_mbit": rx["mbit"], "ping_ms": ping, "tx": tx, "rx": rx}
    finally:
        server.terminate()
        server.wait(timeout=10)


def usb_guest_inner(seconds: float) -> dict[str, Any]:
    """Inside the guest: C ring vs kernel cdc_ether, same f_ecm gadget, same iperf3."""
    from udrv.testbed import ecm_gadget, modprobe, wait_host_device
    from udrv.journal import TxJournal
    from udrv.libusb import LibusbTransport, UsbSelector
    from udrv.tap import Tap
    from udrv.usbtransport import EpType
    from udrv.testbed.ecm_stub import EcmStub

    out: dict[str, Any] = {}
    modprobe("tun", "dummy_hcd", "libcomposite", "usb_f_ecm")
    gadget = ecm_gadget("udrv-bench", vid=GADGET_VID, pid=GADGET_PID)
    gadget.bind()
    dev = wait_host_device(GADGET_VID, GADGET_PID)
    usb0 = gadget.function_attr("ecm.usb0", "ifname")
    _sh("ip", "netns", "add", PEER_NS)
    _sh("ip", "link", "set", usb0, "netns", PEER_NS)
    _sh("ip", "-n", PEER_NS, "addr", "add", f"{PEER_IP}/24", "dev", usb0)
    _sh("ip", "-n", PEER_NS, "link", "set", usb0, "up")
    _sh("ip", "-n", PEER_NS, "link", "set", "lo", "up")

    # 1. the C ring, then 2. the pure-Python engine, between the gadget's bulk endpoints and a TAP
    t = LibusbTransport(UsbSelector(vid=GADGET_VID, pid=GADGET_PID))
    ctl = next(i for i in t.info.interfaces if (i.cls, i.subclass) == (0x02, 0x06))
    data = next(i for i in t.info.interfaces if i.cls == 0x0A and i.alt == 1)
    ep_in = next(e.address for e in data.endpoints if e.is_in and e.type is EpType.BULK)
    ep_out = next(e.address for e in data.endpoints if not e.is_in and e.type is EpType.BULK)
    t.claim_interface(ctl.number)
    t.claim_interface(data.number)
    t.set_alt_setting(data.number, 1)
    tap = Tap("udrvb0")
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap.name)
    tap.set_up(True)
    for name in ("native_ring", "python_engine"):
        journal = TxJournal(1024)
        driver = EcmStub(t, ep_in, ep_out, None)
        stop = threading.Event()
        if name == "native_ring":
            # as many transfers in flight as the kernel's usbnet keeps at high speed (~60 each way):
            # dummy_hcd moves only what is queued when its timer ticks
            dp: Any = usbring.make_usb_datapath(driver, journal, tap.fd, n_rx=64, n_tx=64, zero_packet=True)

            def loop() -> None:      # the GIL is released while C waits and works
                while not stop.is_set():
                    dp.run(0.05)

            def frames() -> int:
                st = dp._read_stats()
                return st.rx_packets + st.tx_packets
        else:
            from udrv.usbnet import UsbNetEngine
            dp = UsbNetEngine(driver, journal, tap.write, n_rx=64, n_tx=64)

            def loop() -> None:      # what the daemon does per turn, in Python
                while not stop.is_set():
                    for f in tap.read_batch(min(64, journal.space())):
                        journal.append(f)
                    dp.xmit()
                    dp.poll(0.001)
                    dp.xmit()

            def frames() -> int:
                c = dp.counters
                return c.rx_packets + c.tx_packets
        dp.start()
        th = threading.Thread(target=loop, daemon=True)
        th.start()
        try:
            out[name] = _iperf_both(seconds, frames)
        finally:
            stop.set()
            th.join(timeout=10)
            c = dp.counters
            out[name].update(rx_packets=c.rx_packets, tx_packets=c.tx_packets, rx_dropped=c.rx_dropped,
                             tx_errors=c.tx_errors)
            dp.stop()
            if name == "native_ring":
                dp.close()
            journal.close()
    t.close()
    tap.close()

    # 2. the kernel's cdc_ether on the same gadget (it probes the interfaces udrv let go)
    modprobe("cdc_ether")
    net_dir = Path(f"{dev}:1.0/net")
    end = time.monotonic() + 10
    while not (net_dir.is_dir() and any(net_dir.iterdir())) and time.monotonic() < end:
        time.sleep(0.1)
    kif = next(net_dir.iterdir()).name
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", kif)
    _sh("ip", "link", "set", kif, "up")
    time.sleep(1.0)
    out["kernel_cdc_ether"] = _iperf_both(seconds)
    out["ratio_tx"] = out["native_ring"]["tx_mbit"] / out["kernel_cdc_ether"]["tx_mbit"]
    out["ratio_rx"] = out["native_ring"]["rx_mbit"] / out["kernel_cdc_ether"]["rx_mbit"]
    out["ratio_tx_py"] = out["native_ring"]["tx_mbit"] / out["python_engine"]["tx_mbit"]
    out["ratio_rx_py"] = out["native_ring"]["rx_mbit"] / out["python_engine"]["rx_mbit"]
    return out


def usb_guest(seconds: float, kernel_args: str = "", smp: int = 1) -> dict[str, Any]:
    """Boot the kernel-tier guest and run usb_guest_inner there."""
    from ..testbed import guest
    from .sidebyside import GUEST_ENV, REPO
    res = guest.run([guest.real_python(), "-m", "udrv.bench.framing", "--usb-guest-inner",
                     "--iperf-seconds", str(seconds)], guest.GuestDevices(smp=smp), timeout=600,
                    kernel_args=kernel_args, env=GUEST_ENV, cwd=REPO)
    lines = [ln for ln in res.output.splitlines() if ln.startswith(REPORT_PREFIX)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"the guest run failed ({res.returncode}):\n{res.output[-3000:]}")
    return json.loads(lines[-1][len(REPORT_PREFIX):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1.0)")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes in bytes (default 64,1500)")
    ap.add_argument("--framing", choices=sorted(FRAMINGS), default="pegasus")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--usb-guest", action="store_true",
                    help="also measure the C ring vs the kernel's cdc_ether in the QEMU guest")
    ap.add_argument("--usb-guest-inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--iperf-seconds", type=float, default=3.0)
    ap.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1)")
    ap.add_argument("--kernel-args", default="", help="extra guest kernel command line (e.g. mitigations=off)")
    a = ap.parse_args(argv)
    if not fastpath.available():
        print(f"bench_native: {fastpath.why_unavailable()}", file=sys.stderr)
        return 2
    if a.usb_guest_inner:
        print(REPORT_PREFIX + json.dumps(usb_guest_inner(a.iperf_seconds)), flush=True)
        return 0
    sizes = [int(s) for s in a.sizes.split(",") if s]
    rows = bench(a.framing, sizes, a.seconds)
    guest_result = usb_guest(a.iperf_seconds, a.kernel_args, a.smp) if a.usb_guest else None
    if a.json:
        print(json.dumps({"framing": rows, "usb_guest": guest_result}, indent=1))
        return 0
    print(f"framing {a.framing}: one frame = encode_tx + decode_rx (frames/s; higher is better)")
    print(f"{'size':>6} {'python':>12} {'cffi call':>12} {'C loop':>12} {'cffi/py':>9} {'C loop/py':>10}")
    for r in rows:
        print(f"{r['size']:>6} {r['python_fps']:>12,.0f} {r['cffi_fps']:>12,.0f} {r['c_loop_fps']:>12,.0f} "
              f"{r['cffi_vs_python']:>8.1f}x {r['c_loop_vs_python']:>9.1f}x")
    if guest_result:
        g = guest_result
        print(f"\nQEMU guest (TCG, {a.smp} vCPU), f_ecm gadget on dummy_hcd, iperf3 TCP (Mbit/s; tx = host -> gadget)")
        for name in ("native_ring", "python_engine", "kernel_cdc_ether"):
            print(f"  {name:<18} tx {g[name]['tx_mbit']:8.1f}   rx {g[name]['rx_mbit']:8.1f}")
        print(f"  C ring / cdc_ether  tx {g['ratio_tx']:8.2f}   rx {g['ratio_rx']:8.2f}")
        print(f"  C ring / Python     tx {g['ratio_tx_py']:8.2f}   rx {g['ratio_rx_py']:8.2f}")
        for name in ("native_ring", "python_engine", "kernel_cdc_ether"):
            r = g[name]
            extra = (f", ring process {r['tx']['ring_process_us_per_frame']:.0f}/"
                     f"{r['rx']['ring_process_us_per_frame']:.0f} us CPU per frame" if "ring_process_us_per_frame" in r["tx"] else "")
            print(f"  {name:<18} ping {r['ping_ms']:.2f} ms, guest CPU busy {r['tx']['guest_cpu_busy_pct']:.0f}/"
                  f"{r['rx']['guest_cpu_busy_pct']:.0f} %{extra}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
