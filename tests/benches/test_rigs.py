"""udrv._rigs (the bench and test-bed C, udrv.testbed.rigs): loaded beside the runtime's C, and
when it is missing, what says so names the fix."""
from __future__ import annotations

import pytest

from udrv import fastpath
from udrv.testbed import pegasus_pump, rigs


def test_it_holds_the_bench_and_testbed_c_and_the_runtime_does_not():
    if not rigs.available():
        pytest.skip(rigs.why_unavailable())
    for fn in ("udrv_tapfwd_bare", "udrv_fakedev_tdt", "udrv_usb_floor_run", "udrv_probe_turn", "udrv_echo_turn",
               "udrv_pegpump_new"):
        assert hasattr(rigs.lib, fn), fn
        assert not hasattr(fastpath.lib, fn), fn
    assert rigs.why_unavailable() == ""


def test_missing_it_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(rigs, "lib", None)
    monkeypatch.setattr(rigs, "_IMPORT_ERROR", "No module named 'udrv._rigs'")
    monkeypatch.setattr(rigs, "_install_note", lambda: None)
    assert "python3 native/build.py" in rigs.why_unavailable()
    with pytest.raises(rigs.RigsUnavailable, match="native/build.py"):
        rigs.require()
    assert not pegasus_pump.available()
    monkeypatch.setattr(rigs, "_install_note", lambda: "no C compiler ('cc' not found)")
    assert rigs.why_unavailable() == "udrv._rigs is not built. At install time: no C compiler ('cc' not found)"


def test_without_the_runtime_c_it_says_that_first(monkeypatch):
    monkeypatch.setattr(rigs, "lib", None)
    monkeypatch.setattr(fastpath, "lib", None)
    monkeypatch.setattr(fastpath, "_IMPORT_ERROR", "No module named 'udrv._native'")
    assert rigs.why_unavailable().startswith("udrv._rigs needs udrv._native, which does not load: udrv._native is")
