"""The stop-and-wait datapath (udrv/usbsimple.py), every USB driver's last implementation: one
transfer in flight each way, frames through in order both ways, on the drivers' models."""
import pytest

from rigs import PEER_MAC, Rig, frame_to
from udrv.drivers.cdc_ecm import CdcEcm
from udrv.drivers.pegasus import Pegasus
from udrv.models.cdc_ecm import EcmModel
from udrv.registry import usb_model_implementations
from udrv.usbsimple import StopAndWaitEngine

DRIVERS = [pytest.param(Pegasus, None, id="pegasus"), pytest.param(CdcEcm, EcmModel, id="cdc_ecm")]


@pytest.mark.parametrize("driver", [Pegasus, CdcEcm])
def test_every_usb_driver_ends_its_implementations_with_stop_and_wait(driver):
    impls = driver.implementations()
    assert impls[-1] is driver.stop_and_wait_variant() and impls[-2] is driver
    assert impls[-1].__name__ == f"{driver.__name__}StopAndWait" and impls[-1].c_variant() is None
    # an embedded model: every implementation but the C ring (it needs libusb's handles)
    assert usb_model_implementations(driver, None) == (driver, driver.stop_and_wait_variant())
    assert usb_model_implementations(driver, "python") == (driver,)


@pytest.mark.parametrize("driver,model", DRIVERS)
def test_frames_go_out_one_transfer_at_a_time_in_order(driver, model):
    rig = Rig(model=model() if model else None, driver=driver.stop_and_wait_variant()).up()
    assert isinstance(rig.nic.engine, StopAndWaitEngine)
    mac = rig.nic.mac
    frames = [frame_to(PEER_MAC, n, 60 + n) for n in range(40)]
    rig.nic.enqueue(frames)
    for _ in range(400):
        rig.nic.xmit()
        rig.nic.poll(0.0)
        if rig.nic.journal.unconfirmed() == 0:
            break
    assert [w[:len(f)] for w, f in zip(rig.wire_tx, frames)] == frames and len(rig.wire_tx) == 40
    assert rig.transport.in_flight() <= 2 + (driver.EP_STATUS is not None)
    assert rig.nic.status()["tx_packets"] == 40
    received = [frame_to(mac, 1000 + n) for n in range(10)]
    for f in received:
        rig.model.wire_receive(f)
        rig.pump(5)
    assert [h[:len(f)] for h, f in zip(rig.host_rx, received)] == received and len(rig.host_rx) == 10


@pytest.mark.parametrize("driver,model", DRIVERS)
def test_only_one_out_transfer_is_ever_in_flight(driver, model):
    rig = Rig(model=model() if model else None, driver=driver.stop_and_wait_variant()).up()
    rig.nic.enqueue([frame_to(PEER_MAC, n) for n in range(5)])
    before = rig.transport.in_flight()
    assert rig.nic.xmit() == 1 and rig.nic.xmit() == 0        # the first is not back yet
    assert rig.transport.in_flight() == before + 1
    assert rig.nic.journal.unsent() == 4
