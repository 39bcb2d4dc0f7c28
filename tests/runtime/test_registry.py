"""The device registry (udrv.registry): a device spec gives its driver's implementations best first,
or the one `--impl` names; a spec it cannot serve gives one sentence that says what to do. And
`udrv run`'s options reach the daemon (udrv.service) as typed options."""
from __future__ import annotations

import logging

import pytest

from udrv import cli, fastpath, registry, service
from udrv.drivers.cdc_ecm import CdcEcm
from udrv.drivers.e1000 import E1000, E1000Native
from udrv.drivers.pegasus import Pegasus
from udrv.errors import UdrvError

needs_c = pytest.mark.skipif(not fastpath.available(), reason=fastpath.why_unavailable() or "-")


@pytest.fixture
def opened():
    devices = []

    def open_(spec, **kw):
        dev = registry.open_device(spec, **kw)
        devices.append(dev)
        return dev
    yield open_
    for d in devices:
        d.transport.close()


@pytest.fixture
def no_fast_path(monkeypatch):
    """udrv._native as if it were not built, and the once-per-process warning not given yet."""
    monkeypatch.setattr(fastpath, "lib", None)
    monkeypatch.setattr(fastpath, "_IMPORT_ERROR", "No module named 'udrv._native'")
    monkeypatch.setattr(fastpath, "_BUILD_NOTES", ("/nonexistent/build-error.txt",))
    monkeypatch.setattr(registry, "_warned_no_fast_path", False)
    monkeypatch.delenv("UDRV_DATAPATH", raising=False)


@needs_c
def test_the_e1000_model_runs_the_c_ring_first_and_the_python_ring_as_its_spare(opened, monkeypatch):
    monkeypatch.delenv("UDRV_DATAPATH", raising=False)
    impls, transport, model = opened("model:e1000")
    assert impls == (E1000Native, E1000)
    assert type(model).__name__ == "E1000Model" and transport.model is model


@pytest.mark.parametrize("spec, driver", [(None, Pegasus), ("model:pegasus", Pegasus), ("model:cdc_ecm", CdcEcm)])
def test_the_usb_models_run_the_python_engine_then_stop_and_wait(opened, spec, driver):
    # the C USB ring submits through libusb's own handles, which an in-process model has not
    dev = opened(spec)
    assert dev.implementations == (driver, driver.stop_and_wait_variant()) and dev.model is not None


def test_impl_python_keeps_the_python_implementation_alone(opened):
    assert opened("model:e1000", impl="python").implementations == (E1000,)
    assert opened("model:pegasus", impl="python").implementations == (Pegasus,)


@needs_c
def test_impl_c_keeps_the_c_implementation_alone(opened):
    assert opened("model:e1000", impl="c").implementations == (E1000Native,)


def test_impl_c_on_a_usb_model_says_to_use_python():
    with pytest.raises(UdrvError, match=r"model:cdc_ecm runs the Python engines .*use --impl python"):
        registry.open_device("model:cdc_ecm", impl="c")


def test_impl_c_without_the_fast_path_says_why(no_fast_path):
    with pytest.raises(UdrvError, match=r"--impl c needs the C fast path: udrv._native is not built.*pip install"):
        registry.open_device("model:e1000", impl="c")


def test_an_unknown_impl_names_the_ones_there_are():
    with pytest.raises(UdrvError, match=r"no implementation called 'rust': use --impl c or --impl python"):
        registry.implementations(E1000, "rust")


def test_without_the_fast_path_the_python_ring_runs_with_one_warning_that_says_why(no_fast_path, caplog, opened):
    with caplog.at_level(logging.WARNING, logger="udrv"):
        assert opened("model:e1000").implementations == (E1000,)
        assert opened("model:e1000").implementations == (E1000,)
    warnings = [r.getMessage() for r in caplog.records if "no-fast-path" in r.getMessage()]
    assert len(warnings) == 1
    assert "e1000" in warnings[0] and fastpath.why_unavailable() in warnings[0]


def test_udrv_datapath_python_asks_for_python_without_a_warning(no_fast_path, monkeypatch, caplog):
    monkeypatch.setenv("UDRV_DATAPATH", "python")
    with caplog.at_level(logging.WARNING, logger="udrv"):
        assert registry.implementations(E1000) == (E1000,)
    assert caplog.records == []


@pytest.mark.parametrize("spec, says", [
    ("eth0", "'eth0' names no device: use usb:VID:PID, usb:BUS-PORT, pci:BDF or model:pegasus|e1000|cdc_ecm"),
    ("model:rtl8139", "no embedded model called 'rtl8139': use one of model:pegasus, model:e1000, model:cdc_ecm"),
])
def test_a_spec_it_cannot_serve_says_what_to_do_in_one_sentence(spec, says):
    with pytest.raises(UdrvError) as e:
        registry.open_device(spec)
    assert str(e.value) == says


def test_wire_pacing_is_refused_where_there_is_no_usb_model_wire():
    with pytest.raises(UdrvError, match="--wire-mbit paces the USB models"):
        registry.open_device("model:e1000", wire_mbit=100)
    with pytest.raises(UdrvError, match="a real device's wire runs at its link speed"):
        registry.open_device("pci:0000:00:03.0", wire_mbit=100)


def test_the_registry_lists_every_shipped_driver_and_matches_by_id():
    assert [c.name for c in registry.usb_drivers()] == ["pegasus", "cdc_ecm"]
    assert [c.name for c in registry.pci_drivers()] == ["e1000"]
    assert registry.pci_driver_for(0x8086, 0x100E) is E1000
    assert registry.pci_driver_for(0x10EC, 0x8139) is None


def test_udrv_run_hands_its_options_to_the_service(monkeypatch):
    got = []
    monkeypatch.setattr(cli, "serve", lambda opts, scenario=None: got.append(opts) or 0)
    assert cli.main(["run", "model:e1000", "--ifname", "udrvx0", "--impl", "python", "--recovery", "restart",
                     "--swap-after", "0", "--no-guards", "--aqm-target", "0", "--aqm-no-ecn", "--duration", "3"]) == 0
    assert got == [service.ServiceOptions(device="model:e1000", ifname="udrvx0", guards=False, duration=3.0,
                                          recovery="restart", impl="python", swap_after=0, aqm_target_ms=0.0,
                                          aqm_ecn=False)]


def test_udrv_run_without_root_says_to_use_sudo(monkeypatch, capsys):
    monkeypatch.setattr(service.os, "geteuid", lambda: 1000)
    assert cli.main(["run", "model:e1000", "--duration", "1"]) == 2
    assert "udrv run needs root" in capsys.readouterr().err
