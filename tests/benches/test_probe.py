"""The 1 ms gap probe (udrv.bench.probe) counts each probe once: a second answer to the same probe
(a frame re-issued after a recovery that the device had already sent) is a duplicate, not a
reply that hides a loss."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from udrv.bench.probe import GapProbe


@pytest.fixture(params=["c", "python"])
def probe_loop(request, monkeypatch):
    if request.param == "c":
        from udrv import fastpath
        if not fastpath.available():
            pytest.skip(f"the C fast path is not built: {fastpath.why_unavailable()}")
    else:
        monkeypatch.setenv("UDRV_PROBE_LOOP", "python")
    return request.param


def test_probe_counts_a_second_answer_as_a_duplicate_not_as_a_reply(probe_loop):
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    answered = [0]

    def echo_twice_every_third() -> None:
        while not stop.is_set():
            try:
                data, addr = srv.recvfrom(64)
            except socket.timeout:
                continue
            srv.sendto(data, addr)
            answered[0] += 1
            if answered[0] % 3 == 0:
                srv.sendto(data, addr)          # the same probe answered again

    t = threading.Thread(target=echo_twice_every_third, daemon=True)
    t.start()
    probe = GapProbe("127.0.0.1", srv.getsockname()[1], interval=0.002).start()
    time.sleep(0.5)
    stop.set()                                  # the echo first: it answers nothing after the count
    t.join()
    time.sleep(0.05)                            # its last answers reach the probe
    res = probe.stop()
    srv.close()
    assert res.sent > 50
    assert res.received <= res.sent                       # never more answers than probes
    assert res.received >= answered[0] - 2                # every probe the echo saw (bar the last in flight)
    assert res.duplicates >= answered[0] // 3 - 2 and res.duplicates > 10
    assert len(probe.times) == res.received
    assert res.loop == probe_loop


def test_probe_sees_a_silence_of_the_echo_as_one_gap_and_the_echo_server_answers(probe_loop):
    """udrv.bench.echo's server (in C when built) answers; 150 ms in which it is stopped are one gap of
    about that length; answers resume after it."""
    import os
    import signal
    import subprocess
    import sys
    port = 20000 + os.getpid() % 20000
    srv = subprocess.Popen([sys.executable, "-m", "udrv.bench.echo", "--port", str(port)])
    try:
        from udrv.bench.echo import roundtrips
        deadline = time.monotonic() + 20
        while roundtrips("127.0.0.1", [8], port=port, timeout=0.2) != 1:
            assert time.monotonic() < deadline, "the echo server never answered"
        probe = GapProbe("127.0.0.1", port, interval=0.001).start()
        time.sleep(0.4)
        srv.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        time.sleep(0.15)
        srv.send_signal(signal.SIGCONT)
        time.sleep(0.4)
        res = probe.stop()
    finally:
        srv.kill()
        srv.wait()
    gap = probe.max_gap_ms(t0, t0 + 0.1)
    assert 140 <= gap < 1000, gap
    assert res.received > 300 and res.loop == probe_loop
    assert probe.times[-1] > t0 + 0.2                      # answers came back after the silence
