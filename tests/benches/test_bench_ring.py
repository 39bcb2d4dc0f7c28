"""Smoke tests of the e1000 benches (udrv/bench/ring.py): each runs at a tiny size and must
report numbers. Speed is not checked here (that is what the bench commands are for)."""
from __future__ import annotations

import math
import os
import re

import pytest

from udrv import native
from udrv.cli import build_parser, main

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"C fast path not built: {native.why_unavailable()}")

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
