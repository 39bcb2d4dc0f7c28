"""The paced wire of the embedded USB models (`udrv run model:X --wire-mbit N`) and the AQM bench
that runs on it."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from udrv.bench.aqm import AqmRun, report
from udrv.models.usb import ModelNoAnswer, ModelStall
from udrv.models.wire import WIRE_OVERHEAD, PacedWire


class Sink:
    """The model behind the wire: what reached its bulk OUT endpoint."""
    info = "a device"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.notified = 0

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        self.frames.append(bytes(data))

    def set_notify(self, fn) -> None:
        pass


def test_a_busy_wire_naks_beyond_its_fifo_and_frees_at_the_line_rate() -> None:
    t = [100.0]
    sink = Sink()
    w = PacedWire(sink, 8.0, fifo_frames=2, clock=lambda: t[0])      # 1 byte per microsecond
    try:
        frame = bytes(1514 - WIRE_OVERHEAD)                            # 1514 us on the wire each
        for _ in range(3):
            w.bulk_out(2, frame)                                       # one on the wire, two queued
        with pytest.raises(ModelNoAnswer):
            w.bulk_out(2, frame)
        assert len(sink.frames) == 3 and w.naks == 1
        t[0] += 1514e-6                                                # one frame's time later
        w.bulk_out(2, frame)
        assert len(sink.frames) == 4
        assert w.info == "a device"                                    # the rest is the model's
    finally:
        w.close()


def test_the_wire_wakes_the_transport_when_a_naked_transfer_fits_again() -> None:
    sink, woken = Sink(), []
    w = PacedWire(sink, 1.0, fifo_frames=1)          # 1 Mbit/s: a 1500-byte frame holds it 12 ms
    w.set_notify(lambda: woken.append(time.monotonic()))
    try:
        w.bulk_out(2, bytes(1500))
        w.bulk_out(2, bytes(1500))
        with pytest.raises(ModelNoAnswer):
            w.bulk_out(2, bytes(1500))
        end = time.monotonic() + 5
        while not woken and time.monotonic() < end:
            time.sleep(0.005)
        assert woken, "the transport was never told the wire freed up"
        w.bulk_out(2, bytes(1500))
    finally:
        w.close()


class Transmitter(Sink):
    """A model that puts what it gets on its wire at once (on_transmit), or STALLs when told."""

    def __init__(self) -> None:
        super().__init__()
        self.on_transmit = None
        self.stalled = False

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        if self.stalled:
            raise ModelStall("EP halted")
        super().bulk_out(endpoint, data)
        self.on_transmit(bytes(data))


def test_a_delayed_wire_answers_at_once_and_delivers_in_order_after_the_delay() -> None:
    model, far = Transmitter(), []
    model.on_transmit = far.append
    w = PacedWire(model, 1000.0, delay=0.05)
    w.delay_transmit()
    try:
        for i in range(3):
            w.bulk_out(2, bytes([i]) * 60)
        assert len(model.frames) == 3 and far == []     # the device took them; the far end waits
        model.stalled = True
        with pytest.raises(ModelStall):                 # the device's own answer is not delayed
            w.bulk_out(2, b"x" * 60)
        end = time.monotonic() + 5
        while len(far) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        assert far == [bytes([i]) * 60 for i in range(3)]
    finally:
        w.close()


def test_bad_wires_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="above 0"):
        PacedWire(Sink(), 0)
    with pytest.raises(ValueError, match="delay"):
        PacedWire(Sink(), 100, delay=-1)
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "run", "model:e1000", "--wire-mbit", "100"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "USB models" in (r.stderr + r.stdout)


def test_the_aqm_report_gives_medians_per_setting_and_says_what_failed() -> None:
    runs = [AqmRun("on", 90.0, 27.0, 28.0, 33.0, 40, {"aqm_drops": 10, "aqm_marks": 0}),
            AqmRun("off", 91.0, 38.0, 39.0, 43.0, 40, {"aqm_drops": 0, "aqm_marks": 0}),
            AqmRun("on", 92.0, 29.0, 30.0, 35.0, 40, {"aqm_drops": 12, "aqm_marks": 1}),
            AqmRun("off", error="RuntimeError: timed out waiting for the peer to answer")]
    text = report(runs, "pegasus", 100, 5, 20)
    assert "| on | 2 | 91.0 | 28.0 ms | 29.0 ms | 34.0 ms | 22 / 1 |" in text
    assert "| off | 1 | 91.0 | 38.0 ms | 39.0 ms | 43.0 ms | 0 / 0 |" in text
    assert "- off: RuntimeError: timed out waiting for the peer to answer" in text


@pytest.mark.root
def test_udrv_bench_aqm_runs_traffic_no_faster_than_the_wire() -> None:
    r = subprocess.run([sys.executable, "-m", "udrv.cli", "bench", "aqm", "--seconds", "2", "--aqm", "on",
                        "--bench-rounds", "1", "--wire-mbit", "50", "--wire-delay-ms", "10", "--ifname", "udrvqt0"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| on |"))
    mbit = float(row.split("|")[3])
    assert 0 < mbit <= 50, row                        # the wire is the bottleneck, never exceeded
