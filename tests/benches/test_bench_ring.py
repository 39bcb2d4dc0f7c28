"""Smoke tests of the e1000 benches (udrv/bench/ring.py): each runs at a tiny size and must
report numbers. Speed is not checked here (that is what the bench commands are for)."""
from __future__ import annotations

import math
import os
import re

import pytest

from udrv import fastpath
from udrv.cli import build_parser, main

pytestmark = pytest.mark.skipif(not fastpath.available(),
                                reason=f"C fast path not built: {fastpath.why_unavailable()}")

NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def positive(xs: list[float]) -> bool:
    return bool(xs) and all(math.isfinite(x) and x > 0 for x in xs)


def test_parser_takes_the_new_bench_options():
    p = build_parser()
    a = p.parse_args(["bench", "ring", "--size", "64", "--size", "1500"])
    assert (a.what, a.size) == ("ring", [64, 1500])
    a = p.parse_args(["bench", "guard", "--driver", "e1000"])
    assert (a.what, a.driver, a.size) == ("guard", "e1000", None)
    a = p.parse_args(["bench", "guard"])
    assert a.driver is None              # guard: pegasus; recovery: every embedded driver
    assert p.parse_args(["bench", "tap"]).what == "tap"


def test_ring_bench_reports_numbers(capsys):
    from udrv.bench.ring import ring_speed
    r = ring_speed(sizes=[64], frames=300, rounds=1)
    (s,) = r.sizes
    for case in ("tx", "rx_call", "rx_fd", "floor"):
        for impl in ("py", "c"):
            assert positive(s.ns[(case, impl)]), (case, impl)
    assert positive(s.ratios("tx"))
    text = r.report()
    for label in ("TX", "RX -> Python callable", "RX -> fd (/dev/null)"):
        assert re.search(rf"\| 64 B \| {re.escape(label)} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| "
                         rf"{NUMBER} \(range {NUMBER}\.\.{NUMBER}\)x", text), label
    # the command prints the same table
    assert main(["bench", "ring", "--size", "64", "--frames", "200", "--rounds", "1"]) == 0
    assert re.search(rf"\| 64 B \| TX \| {NUMBER} ", capsys.readouterr().out)


def test_guard_bench_e1000_reports_numbers(capsys):
    from udrv.bench.ring import guard_overhead_e1000
    r = guard_overhead_e1000(frames=1024, rounds=1)
    assert positive(r.on_fps) and positive(r.off_fps) and r.calls_per_frame > 0
    assert re.search(rf"ratio on/off = {NUMBER} ", r.report())
    assert main(["bench", "guard", "--driver", "e1000", "--frames", "1024", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "e1000 driver" in out and re.search(rf"guards off: {NUMBER} frames/s", out)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="creates two TAP interfaces: needs root and /dev/net/tun")
def test_tap_bench_reports_numbers(capsys):
    from udrv.bench.ring import tap_forward
    r = tap_forward(frames=400, rounds=1)
    cases = ["bare_c", "bare_py", "udrv"] + ([] if r.ring_reads_tap else ["udrv_cread"])
    for case in cases:
        assert positive(r.pps[case]), case
    assert sorted(r.pps) == sorted(cases)
    assert re.search(rf"\| udrv, the daemon's loop: .* \| {NUMBER} \| {NUMBER} \| [+-]{NUMBER} \| {NUMBER} \(range",
                     r.report())
    assert main(["bench", "tap", "--frames", "300", "--rounds", "1"]) == 0
    assert re.search(rf"\| bare C loop .* \| {NUMBER} \| {NUMBER} \|", capsys.readouterr().out)


def test_the_bench_c_fills_a_journal_the_runtime_c_mapped():
    """udrv._rigs includes udrv._native's types: a `struct udrv_journal *` mapped by the runtime's
    C is one the bench C's TAP reader (native/rigs/tapfwd.c) appends to."""
    import socket
    from udrv.journal import TxJournal
    from udrv.testbed import rigs
    if not rigs.available():
        pytest.skip(rigs.why_unavailable())
    j = TxJournal(nslots=8, slot_size=2048)
    cj = fastpath.ffi.new("struct udrv_journal *")
    assert fastpath.lib.udrv_journal_map_fd(cj, j.fd, j.nslots, j.slot_size) == 0
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        b.setblocking(False)
        frames = [bytes([i]) * (60 + i) for i in range(3)]
        for f in frames:
            a.send(f)
        st = rigs.ffi.new("struct udrv_tapfwd_stats *")
        assert rigs.lib.udrv_tapfwd_to_journal(b.fileno(), cj, 8, st) == 3     # then EAGAIN: the fd is empty
        assert (st.frames, st.bytes, st.read_errors) == (3, sum(map(len, frames)), 0)
        j.sync()
        assert [j.take_unsent()[1] for _ in frames] == frames and j.take_unsent() is None
    finally:
        fastpath.lib.udrv_journal_unmap(cj)
        a.close()
        b.close()
        j.close()
