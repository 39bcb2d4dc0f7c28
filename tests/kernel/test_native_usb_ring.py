"""Kernel tier: the C USB ring (udrv.usbring.NativeUsbRing) on a real USB device.

The device is the kernel's own CDC-ECM function (configfs f_ecm) on dummy_hcd; its host side is
claimed through python-libusb1 (the kernel's cdc_ether, if loaded, is detached), the data
interface is switched to alt setting 1, and the C ring runs between its bulk endpoints (RAW
framing) and a TAP. Frames cross both ways through AF_PACKET sockets bound to the gadget's usb0
and to the TAP, byte-exact and in order, including lengths that are a multiple of the 512-byte
packet size (the ring asks for a ZLP there); the ring's counters, the netdevs' statistics and
the TX journal must agree; ECM notifications arrive through the interrupt-endpoint queue; a
reset (cancel, clear halts, rewind, restart) with OUT transfers in flight loses nothing and
leaks no transfer, nor does the OUT-only recycle (the IN transfers stay queued); an unplug under a running ring surfaces as DeviceGone.

The guest side is this file run as a script inside the guest; it prints one JSON report line.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from udrv.testbed.ecm_stub import EcmStub


GADGET_VID, GADGET_PID = 0x0525, 0xA4A2
ETHERTYPE = 0x88B6                 # IEEE local experimental: nothing else in the guest uses it
TAP_NAME = "udrvn0"
REPORT_PREFIX = "NATIVE-RING-REPORT "
SIZES = [60, 64, 100, 511, 512, 513, 1000, 1024, 1500, 1514]   # 512/1024: whole high-speed packets


# =============================================================================================
# guest side
# =============================================================================================

def _frame(dst: bytes, src: bytes, n: int, size: int, tag: int) -> bytes:
    head = dst + src + ETHERTYPE.to_bytes(2, "big") + bytes((tag,)) + n.to_bytes(4, "big")
    return head + bytes((n * 7 + i) & 0xFF for i in range(size - len(head)))


def _stat(ifname: str, what: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/{what}").read_text())


def _exchange(ring: Any, tap_sock: socket.socket, gad_sock: socket.socket, tap_mac: bytes,
              gad_mac: bytes, count: int, tag: int, timeout: float = 60.0) -> dict[str, Any]:
    """count frames each way, interleaved; returns what arrived where."""
    to_gadget = [_frame(gad_mac, tap_mac, i, SIZES[i % len(SIZES)], tag) for i in range(count)]
    to_host = [_frame(tap_mac, gad_mac, i, SIZES[(i + 3) % len(SIZES)], tag) for i in range(count)]
    got_gadget: list[bytes] = []
    got_host: list[bytes] = []
    sent = 0
    end = time.monotonic() + timeout
    while (len(got_gadget) < count or len(got_host) < count) and time.monotonic() < end:
        for _ in range(4):                      # a few at a time: the TAP queue is 500 frames
            if sent < count:
                tap_sock.send(to_gadget[sent])  # host stack -> TAP -> ring -> bulk OUT -> usb0
                gad_sock.send(to_host[sent])    # usb0 -> bulk IN -> ring -> TAP -> host stack
                sent += 1
        ring.xmit()
        ring.poll(0.002)
        for sock, got in ((gad_sock, got_gadget), (tap_sock, got_host)):
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] != socket.PACKET_OUTGOING and len(data) > 14 and data[14] == tag:
                    got.append(data)
    return {"to_gadget_ok": got_gadget == to_gadget, "to_host_ok": got_host == to_host,
            "to_gadget": len(got_gadget), "to_host": len(got_host),
            "first_bad_to_gadget": next((i for i, (a, b) in enumerate(zip(got_gadget, to_gadget)) if a != b), None),
            "first_bad_to_host": next((i for i, (a, b) in enumerate(zip(got_host, to_host)) if a != b), None)}


def _reset_with_frames_in_flight(ring: Any, tap_sock: socket.socket, gad_sock: socket.socket,
                                 tap_mac: bytes, gad_mac: bytes, usb0: str, count: int = 60,
                                 tag: int = 3, how: str = "reset") -> dict[str, Any]:
    """Invariant 2 on a real device: a reset (or the OUT-only recycle) while OUT transfers are
    in flight re-issues them; every frame arrives, at most the re-issued ones twice."""
    frames = [_frame(gad_mac, tap_mac, i, SIZES[i % len(SIZES)], tag) for i in range(count)]
    os.system(f"ip link set {usb0} down")    # the gadget queues no OUT requests: transfers wait
    for f in frames:
        tap_sock.send(f)
    time.sleep(0.05)
    submitted = ring.xmit()                  # n_tx transfers go to the device ...
    for _ in range(20):
        ring.poll(0.005)
    in_device = ring.journal.in_device()
    rx_before = ring.rx_inflight
    if how == "reset":                       # ... and are cancelled before the device took them
        reissued, what = ring.reset(), "reset"
    else:
        reissued, what = ring.recycle(clear_halts=True)
    rx_after = ring.rx_inflight
    os.system(f"ip link set {usb0} up")
    got = _collect(ring, gad_sock, tag, count)
    return {"submitted": submitted, "in_device": in_device, "reissued": reissued, "what": what,
            "rx_inflight_before": rx_before, "rx_inflight_after": rx_after,
            "received": len(got), "unique": len(set(got)), "all_arrived": set(got) == set(frames),
            "in_order_after_dedup": list(dict.fromkeys(got)) == frames}


def _collect(ring: Any, gad_sock: socket.socket, tag: int, count: int) -> list[bytes]:
    """Turn the ring until `count` distinct frames of `tag` reached usb0 (30 s at most)."""
    got: list[bytes] = []
    end = time.monotonic() + 30
    while len(set(got)) < count and time.monotonic() < end:
        ring.xmit()
        ring.poll(0.002)
        while True:
            try:
                data, addr = gad_sock.recvfrom(65536)
            except BlockingIOError:
                break
            except OSError as e:         # the socket reports the down/up of usb0 once
                if e.errno != errno.ENETDOWN:
                    raise
                continue
            if addr[2] != socket.PACKET_OUTGOING and len(data) > 14 and data[14] == tag:
                got.append(data)
    for _ in range(50):
        ring.poll(0.01)
    return got


def _tx_stall_clock(ring: Any, tap_sock: socket.socket, tap_mac: bytes, gad_mac: bytes, usb0: str,
                    tag: int = 6, count: int = 8) -> dict[str, Any]:
    """The ring's TX hang clock on a real device: with OUT transfers that wait (usb0 down), run()
    comes back after the stall time, not at its timeout; restart_tx_clock() gives the waiting
    transfers the whole stall time again; with the clock off run() sleeps its whole timeout;
    usb0 up: the waiting transfers complete."""
    os.system(f"ip link set {usb0} down")
    for _ in range(30):                      # the link-down notification ends a run() early: not here
        ring.poll(0.01)
    frames = [_frame(gad_mac, tap_mac, i, 100, tag) for i in range(count)]
    for f in frames:
        tap_sock.send(f)
    ring.watch_tx(0.2)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    ring.run(3.0)                            # reads the TAP, submits, waits on USB
    out["first_s"] = round(time.monotonic() - t0, 3)
    _, since = ring.tx_clock()
    out["waited_s"] = None if since is None else round(time.monotonic() - since, 3)
    ring.restart_tx_clock()
    t0 = time.monotonic()
    ring.run(3.0)
    out["after_restart_s"] = round(time.monotonic() - t0, 3)
    ring.watch_tx(0)
    t0 = time.monotonic()
    ring.run(0.5)
    out["unwatched_s"] = round(time.monotonic() - t0, 3)
    out["in_device"] = ring.journal.in_device()
    before = {k: _stat(usb0, k) for k in ("rx_packets", "rx_dropped")}
    os.system(f"ip link set {usb0} up")
    for _ in range(100):
        ring.poll(0.01)
    out["usb0"] = {k: _stat(usb0, k) - v for k, v in before.items()}
    ring.journal.sync()
    out["journal"] = {"head": ring.journal.head, "sent": ring.journal.sent, "tail": ring.journal.tail}
    return out


def guest_main() -> dict[str, Any]:
    from udrv import fastpath, usbring
    from udrv.testbed import ecm_gadget, modprobe, wait_host_device
    from udrv.journal import TxJournal
    from udrv.libusb import LibusbTransport, UsbSelector
    from udrv.tap import Tap
    from udrv.usbtransport import EpType

    report: dict[str, Any] = {"native": fastpath.available(), "why": fastpath.why_unavailable()}
    if not fastpath.available():
        return report
    for conf in ("all", "default"):          # no IPv6 chatter on the interfaces we count
        Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1\n")
    modprobe("tun", "dummy_hcd", "libcomposite", "usb_f_ecm")
    gadget = ecm_gadget("udrv-native", vid=GADGET_VID, pid=GADGET_PID,
                        dev_addr="02:00:00:00:0e:02", host_addr="02:00:00:00:0e:01")
    gadget.bind()
    wait_host_device(GADGET_VID, GADGET_PID)
    usb0 = gadget.function_attr("ecm.usb0", "ifname")
    os.system(f"ip link set {usb0} up")

    t = LibusbTransport(UsbSelector(vid=GADGET_VID, pid=GADGET_PID))
    ctl = next(i for i in t.info.interfaces if (i.cls, i.subclass) == (0x02, 0x06))
    data = next(i for i in t.info.interfaces if i.cls == 0x0A and i.alt == 1)
    ep_in = next(e.address for e in data.endpoints if e.is_in and e.type is EpType.BULK)
    ep_out = next(e.address for e in data.endpoints if not e.is_in and e.type is EpType.BULK)
    ep_status = next((e.address for e in ctl.endpoints if e.type is EpType.INTERRUPT), None)
    t.claim_interface(ctl.number)            # detaches cdc_ether if it bound the device
    t.claim_interface(data.number)
    t.set_alt_setting(data.number, 1)         # ECM: alt 1 = the bulk pair is live
    report.update(endpoints=[ep_in, ep_out, ep_status], speed=t.info.speed,
                  max_packet=t.endpoint(ep_out).max_packet)

    tap = Tap(TAP_NAME)
    tap.set_up(True)
    journal = TxJournal(256)
    driver = EcmStub(t, ep_in, ep_out, ep_status)
    ring = usbring.make_usb_datapath(driver, journal, tap.fd, n_rx=8, n_tx=8, zero_packet=True)
    ring.start()

    def sock(ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        s.bind((ifname, ETHERTYPE))
        s.setblocking(False)
        return s

    tap_sock, gad_sock = sock(TAP_NAME), sock(usb0)
    tap_mac, gad_mac = tap.mac(), bytes.fromhex(Path(f"/sys/class/net/{usb0}/address").read_text().strip().replace(":", ""))
    base = {k: _stat(usb0, k) for k in ("rx_packets", "tx_packets")}
    tap_base = {k: _stat(TAP_NAME, k) for k in ("rx_packets", "tx_packets")}
    n = 200
    t0 = time.monotonic()
    report["phase1"] = _exchange(ring, tap_sock, gad_sock, tap_mac, gad_mac, n, tag=1)
    report["phase1"]["seconds"] = round(time.monotonic() - t0, 2)
    for _ in range(50):                      # let the last completions land
        ring.poll(0.01)
    journal.sync()
    report["journal_after_phase1"] = {"head": journal.head, "sent": journal.sent, "tail": journal.tail}

    # a recovery in the middle of the device's life: cancel, clear halts, rewind, restart
    report["reissued_by_reset"] = ring.reset()
    report["phase2"] = _exchange(ring, tap_sock, gad_sock, tap_mac, gad_mac, n, tag=2)
    for _ in range(50):
        ring.poll(0.01)
    report["phase3"] = _reset_with_frames_in_flight(ring, tap_sock, gad_sock, tap_mac, gad_mac, usb0)
    # the recovery after a fault the device reported: OUT recycled, IN transfers left queued
    report["phase4"] = _reset_with_frames_in_flight(ring, tap_sock, gad_sock, tap_mac, gad_mac, usb0,
                                                    tag=4, how="recycle")
    report["phase5"] = _exchange(ring, tap_sock, gad_sock, tap_mac, gad_mac, 50, tag=5)
    for _ in range(50):
        ring.poll(0.01)
    journal.sync()
    c = ring.counters
    report["counters"] = {"rx_packets": c.rx_packets, "tx_packets": c.tx_packets, "rx_bytes": c.rx_bytes,
                          "tx_bytes": c.tx_bytes, "rx_dropped": c.rx_dropped, "tx_errors": c.tx_errors,
                          "status_packets": c.status_packets}
    report["tap_counters"] = ring.tap_counters()
    report["status"] = [d.hex() for d in driver.status]
    report["journal"] = {"head": journal.head, "sent": journal.sent, "tail": journal.tail,
                         "reissued": journal.reissued}
    report["usb0"] = {k: _stat(usb0, k) - base[k] for k in base}
    report["tap"] = {k: _stat(TAP_NAME, k) - tap_base[k] for k in tap_base}
    report["tx_stall"] = _tx_stall_clock(ring, tap_sock, tap_mac, gad_mac, usb0)
    ring.stop()
    report["in_flight_after_stop"] = ring.in_flight()
    report["leaked_transfers"] = ring.leaked_transfers
    report["live_actions"] = driver.actions.live()

    # the device goes away under a running ring: poll() raises DeviceGone, nothing leaks
    from udrv.errors import DeviceGone
    ring.start()
    gadget.soft_connect(False)
    report["unplug"] = "no error"
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            ring.poll(0.01)
        except DeviceGone as e:
            report["unplug"] = f"DeviceGone: {e}"
            break
    ring.stop()
    report["in_flight_after_unplug"] = ring.in_flight()
    before_close = ring.tap_counts()
    ring.close()
    # a restart absorbs the counts of the ring it just closed (Nic._absorb_counts)
    report["tap_counts_kept_after_close"] = ring.tap_counts() == before_close and ring.counters.rx_packets == 2 * 200 + 50
    t.close()
    tap.close()
    gadget.remove()
    return report


# =============================================================================================
# host side (pytest)
# =============================================================================================

try:
    import pytest
except ImportError:        # the guest side runs without pytest
    pytest = None  # type: ignore[assignment]


def _report(guest) -> dict[str, Any]:
    from udrv import fastpath, usbring
    if not fastpath.available():
        pytest.skip(f"the C fast path is not built: {fastpath.why_unavailable()}")
    res = guest.run([guest.python, str(Path(__file__).resolve()), "guest"], timeout=180)
    lines = [ln for ln in res.output.splitlines() if ln.startswith(REPORT_PREFIX)]
    assert res.returncode == 0 and lines, f"guest run failed ({res.returncode}):\n{res.output[-3000:]}"
    return json.loads(lines[-1][len(REPORT_PREFIX):])


if pytest is not None:
    @pytest.fixture(scope="module")
    def report(guest) -> dict[str, Any]:
        """One guest run for the tests below."""
        return _report(guest)


def test_native_ring_moves_frames_both_ways_on_a_real_usb_device(report) -> None:
    r = report
    assert r["native"], r["why"]
    n = 200
    for phase in ("phase1", "phase2"):
        p = r[phase]
        assert p["to_gadget"] == n and p["to_gadget_ok"], (phase, p)     # TAP -> bulk OUT -> usb0
        assert p["to_host"] == n and p["to_host_ok"], (phase, p)         # usb0 -> bulk IN -> TAP
    m, k = 2 * 60, 50                        # frames of the two in-flight phases, of phase 5
    for p in (r["phase3"], r["phase4"]):
        assert p["submitted"] == 8 and p["in_device"] == 8, p
        assert p["all_arrived"] and p["in_order_after_dedup"], p          # nothing lost
        assert p["reissued"] == 8, p                                    # the 8 cancelled OUT transfers
        assert p["received"] - p["unique"] <= p["reissued"], p           # duplicates only from re-issue
    p4 = r["phase4"]
    assert p4["what"] == "OUT transfers recycled, IN transfers kept", p4
    assert p4["rx_inflight_before"] == p4["rx_inflight_after"] == 8, p4  # the IN side untouched
    p5 = r["phase5"]                                                     # and both ways after it
    assert p5["to_gadget"] == k and p5["to_gadget_ok"] and p5["to_host"] == k and p5["to_host_ok"], p5
    c = r["counters"]
    assert c["tx_packets"] == 2 * n + m + k and c["rx_packets"] == 2 * n + k, c
    assert c["rx_dropped"] == {} and c["tx_errors"] == {}, c
    # the netdevs saw the same frames the ring counted
    dups = sum(p["received"] - p["unique"] for p in (r["phase3"], r["phase4"]))
    assert r["usb0"]["rx_packets"] == 2 * n + m + k + dups and r["usb0"]["tx_packets"] == 2 * n + k, r["usb0"]
    assert r["tap"]["rx_packets"] == 2 * n + k and r["tap"]["tx_packets"] == 2 * n + m + k, r["tap"]
    assert r["tap_counters"]["tap_frames_in"] == 2 * n + m + k
    # every frame read from the TAP is confirmed by the device: nothing left in the journal
    j = r["journal"]
    assert j["head"] == j["sent"] == j["tail"] == 2 * n + m + k, j
    assert j["reissued"] == r["phase3"]["reissued"] + p4["reissued"], j
    assert r["journal_after_phase1"] == {"head": n, "sent": n, "tail": n}
    assert r["reissued_by_reset"] == 0
    # ECM notifications (NETWORK_CONNECTION, SPEED_CHANGE) came through the interrupt queue
    assert c["status_packets"] >= 1 and r["status"], r["status"]
    assert r["status"][0][:4] in ("a100", "a12a"), r["status"]
    # no leaked transfers, no leftover actions
    assert r["in_flight_after_stop"] == 0 and r["leaked_transfers"] == 0
    assert r["live_actions"] == []
    # unplugged under a running ring: reported as DeviceGone (the guard's cue), transfers reaped
    assert r["unplug"].startswith("DeviceGone: the USB device disappeared"), r["unplug"]
    assert r["in_flight_after_unplug"] == 0
    assert r["tap_counts_kept_after_close"]


def test_native_ring_comes_back_when_out_transfers_wait_past_the_stall_time(report) -> None:
    st = report["tx_stall"]
    # stall time 0.2 s, run() timeouts 3 s: back on the clock, not on the timeout (loose upper
    # bounds: a TCG guest on a shared host), and never before the stall time
    assert 0.19 <= st["first_s"] < 2.0 and st["waited_s"] >= 0.19, st
    assert 0.19 <= st["after_restart_s"] < 2.0, st     # restarted: the whole stall time again
    assert st["unwatched_s"] >= 0.49, st               # clock off: nothing ends the sleep early
    # usb0 up: the waiting transfers complete inside its open, and usb0 counts the frames —
    # before its AF_PACKET sockets are hooked again (NETDEV_UP comes after), so they count them
    # as dropped: the journal and the netdev's counter are the witnesses here
    assert st["in_device"] == 8, repr(st)             # all 8 waited in OUT transfers meanwhile
    assert st["usb0"]["rx_packets"] == 8 and st["journal"]["head"] == st["journal"]["tail"], repr(st)


if __name__ == "__main__":
    if sys.argv[1:] == ["guest"]:
        out = guest_main()
        print(REPORT_PREFIX + json.dumps(out), flush=True)
