"""Recovery on the pegasus rig beyond the per-entry conformance (tests/drivers/
test_recovery_conformance.py runs every entry point and fault kind on every driver): partial
effects undone, TX hang detection and the link, counters across a restart, malformed input,
unplug and replug, leaks, reports, implementation swaps, deadlines on slow machines."""
import gc
import os
import time

import pytest

from rigs import PEER_MAC, Rig, frame_to
from udrv.datapath import Capabilities
from udrv.driver import RxMode
from udrv.errors import UdrvError

NEW_MAC = bytes.fromhex("02c0ffee0001")


@pytest.fixture
def wrig(watchdog):
    r = Rig(watchdog=watchdog, config_deadline=0.15, datapath_deadline=0.15).up()
    yield r
    r.nic.close()


def test_partial_effect_of_a_faulting_call_is_undone(wrig):
    """set_mac raises after writing the new address: the restore puts the old one back."""
    wrig.nic.inject("set_mac", "raise", count=2)
    old = bytes(wrig.model.regs[0x10:0x16])
    with pytest.raises(UdrvError):
        wrig.nic.set_mac(NEW_MAC)
    assert wrig.model.last_write(0x10) == NEW_MAC[0]     # the faulty call did write...
    assert bytes(wrig.model.regs[0x10:0x16]) == old      # ...and the rollback undid it


def test_tx_hang_is_detected_by_progress_timeout():
    r = Rig(tx_timeout=0.05).up()
    r.model.hold_tx(True)
    frames = [frame_to(PEER_MAC, i) for i in range(20)]
    r.nic.enqueue(frames)
    r.pump()
    assert r.wire_tx == [] and r.nic.journal.in_device() > 0
    assert r.nic.check_tx_progress()                      # not yet overdue
    time.sleep(0.08)
    assert not r.nic.check_tx_progress()                  # overdue: recovery ran
    rec = r.nic.recoveries[-1]
    assert rec.entry == "xmit" and rec.fault == "tx_timeout" and rec.reissued > 0
    r.model.hold_tx(False)
    r.pump(50)
    assert set(frames) <= set(r.wire_tx) and r.nic.journal.unconfirmed() == 0


def test_frames_received_do_not_hide_a_tx_hang():
    r = Rig(tx_timeout=0.05).up()
    r.model.hold_tx(True)
    r.nic.enqueue([frame_to(PEER_MAC, i) for i in range(5)])
    r.pump()
    deadline = time.monotonic() + 0.12
    while time.monotonic() < deadline:                    # RX keeps flowing while TX is stuck
        r.model.wire_receive(frame_to(r.nic.mac, 1))
        r.pump(2)
        r.nic.check_tx_progress()
        time.sleep(0.01)
    assert r.host_rx and r.nic.recoveries and r.nic.recoveries[0].fault == "tx_timeout"
    r.nic.close()


def _held(r, n: int = 10) -> list[bytes]:
    """n frames the device holds (hold_tx), sent and left for longer than tx_timeout (0.05 s)."""
    r.model.hold_tx(True)
    frames = [frame_to(PEER_MAC, i) for i in range(n)]
    r.nic.enqueue(frames)
    r.pump()
    r.nic.check_tx_progress()
    time.sleep(0.08)
    return frames


def _released(r, frames: list[bytes]) -> None:
    """The device takes frames again: every held one reaches the wire, nothing stays unconfirmed."""
    r.model.hold_tx(False)
    r.pump(50)
    assert set(frames) <= set(r.wire_tx) and r.nic.journal.unconfirmed() == 0
    r.nic.close()


def test_a_tx_hang_restores_the_device_and_a_second_one_restarts_the_driver():
    r = Rig(tx_timeout=0.05).up()
    writes = r.transport.device_writes
    frames = _held(r)
    assert not r.nic.check_tx_progress()
    rec = r.nic.recoveries[-1]
    # a hang is the device's: restored (registers written), the OUT side recycled, no restart
    assert rec.fault == "tx_timeout" and rec.outcome == "recovered" and rec.device_restored
    assert r.transport.device_writes > writes and r.nic.counters.restarts == 0
    r.pump()
    time.sleep(0.08)
    assert not r.nic.check_tx_progress()                  # still nothing confirmed: restart
    rec = r.nic.recoveries[-1]
    assert rec.fault == "tx_timeout" and rec.outcome == "escalated" and "still hung" in rec.detail
    assert r.nic.counters.restarts == 1 and r.nic.state == "up"
    _released(r, frames)


def test_frames_waiting_for_a_link_that_is_down_restore_the_device_once_then_wait():
    r = Rig(tx_timeout=0.05).up()
    r.model.set_link(False)               # the cable is out; this device keeps the frames
    frames = _held(r)
    # the suspected hang asks the link first: down. The device may have lost its link with its
    # state, so it is restored, once ...
    assert not r.nic.check_tx_progress()
    rec = r.nic.recoveries[-1]
    assert (rec.fault, rec.outcome) == ("tx_timeout", "recovered") and rec.device_restored
    assert "link is down" in rec.detail and not r.nic.link.up
    # ... and after that the frames wait for the link: no recovery, no restart, however long
    for _ in range(3):
        time.sleep(0.08)
        r.pump()
        assert r.nic.check_tx_progress()
    assert len(r.nic.recoveries) == 1 and r.nic.counters.restarts == 0
    # (the re-issued frames get a whole tx_timeout of their own first)
    waits = r.nic.counters.tx_waits_for_carrier
    assert waits >= 2 and r.nic.status()["tx_waits_for_carrier"] == waits
    # the link is back and the frames still do not move: that is a hang
    r.model.set_link(True)
    time.sleep(0.08)
    assert not r.nic.check_tx_progress()
    rec = r.nic.recoveries[-1]
    assert (rec.fault, rec.outcome) == ("tx_timeout", "recovered") and "link" not in rec.detail
    assert r.nic.link.up and r.nic.counters.restarts == 0
    _released(r, frames)


def _clocked(r) -> dict:
    """Give the rig's engine the C ring's hang clock (NativeUsbRing.tx_clock), set by hand."""
    clock = {"done": 0.0, "since": None}
    r.nic.engine.tx_clock = lambda: (clock["done"], clock["since"])
    r.nic.engine.caps = Capabilities(keeps_tx_clock=True)
    assert r.nic.keeps_tx_clock()
    return clock


def test_a_ring_that_keeps_its_own_tx_clock_is_judged_by_it_however_rarely_python_looks():
    r = Rig(tx_timeout=0.5).up()
    r.nic.guard.escalate_after = 10        # hangs come faster here than the window rule allows
    try:
        clock, now = _clocked(r), time.monotonic()
        assert r.nic.check_tx_progress(now)                  # nothing in flight
        clock["since"] = now - 0.4                           # waiting, not yet for tx_timeout
        assert r.nic.check_tx_progress(now) and not r.nic.recoveries
        # the first look in a long while, and the OUT side has waited longer than tx_timeout
        clock["since"] = now - 0.6
        assert not r.nic.check_tx_progress(now)
        rec = r.nic.recoveries[-1]
        assert (rec.fault, rec.outcome) == ("tx_timeout", "recovered") and rec.device_restored
        # an OUT completion since: TX moved, so the next hang is a first one again
        clock["done"], clock["since"] = now + 0.1, now + 0.1 - 0.6
        assert not r.nic.check_tx_progress(now + 0.1)
        assert r.nic.recoveries[-1].outcome == "recovered" and r.nic.counters.restarts == 0
        # nothing completed after that one: the driver restarts
        assert not r.nic.check_tx_progress(now + 0.2)
        rec = r.nic.recoveries[-1]
        assert (rec.fault, rec.outcome) == ("tx_timeout", "escalated") and "still hung" in rec.detail
        assert r.nic.counters.restarts == 1 and r.nic.state == "up"
    finally:
        r.nic.close()


def test_a_ring_whose_frames_wait_for_the_link_has_its_tx_clock_started_again():
    r = Rig(tx_timeout=0.5).up()
    try:
        clock, now = _clocked(r), time.monotonic()
        restarted = []
        r.nic.engine.restart_tx_clock = lambda: restarted.append(True)
        r.model.set_link(False)
        clock["since"] = now - 0.6
        assert not r.nic.check_tx_progress(now)              # the one restore of the spell
        # its C loop came back on the stall again; the link is still down: no hang, and the
        # ring's clock starts again (else the loop would come back at once, turn after turn)
        assert r.nic.check_tx_progress(now + 0.1)
        assert restarted == [True] and len(r.nic.recoveries) == 1
        assert r.nic.counters.tx_waits_for_carrier == 1
    finally:
        r.nic.close()


def test_the_interface_counters_survive_a_restart(wrig):
    wrig.send([frame_to(PEER_MAC, i) for i in range(5)])
    wrig.model.wire_receive(frame_to(wrig.nic.mac, 1))
    wrig.pump()
    before = wrig.nic.status()
    assert before["tx_packets"] == 5 and before["rx_packets"] == 1
    wrig.nic.inject("link_check", "raise", count=2)   # escalates -> full restart, a new engine
    with pytest.raises(UdrvError):
        wrig.nic.link_check()
    assert wrig.nic.counters.restarts == 1
    wrig.send([frame_to(PEER_MAC, 9)])
    after = wrig.nic.status()
    assert after["tx_packets"] == 6 and after["rx_packets"] == 1, after
    assert after["tx_bytes"] > before["tx_bytes"]


@pytest.mark.parametrize("kind", ["length_beyond_transfer", "zero_length", "crc_error", "runt",
                                  "truncated", "oversize", "too_long", "dribble"])
def test_malformed_rx_is_counted_by_reason(rig, kind):
    good = frame_to(rig.nic.mac, 1)
    rig.model.inject_rx_garbage(kind)
    rig.model.wire_receive(good)
    rig.pump()
    assert rig.host_rx == [good]
    assert rig.nic.engine.counters.rx_dropped == {kind: 1}
    assert rig.nic.recoveries == []                    # bad input is counted, not a fault


def test_stalled_rx_endpoint_is_cleared(rig):
    rig.model.stall_endpoint(0x81)
    rig.pump()
    good = frame_to(rig.nic.mac, 2)
    rig.model.wire_receive(good)
    rig.pump()
    assert rig.host_rx == [good]
    assert rig.model.counters.clear_halts >= 1


def test_unplug_goes_down_and_replug_comes_back():
    r = Rig(config_deadline=0.5).up()
    r.nic.set_mac(NEW_MAC)
    r.model.unplug()
    r.pump()
    assert r.nic.state == "down"
    assert "gone" in r.nic.last_error
    with pytest.raises(UdrvError):
        r.nic.restart()
    r.model.replug()
    r.nic.restart()
    assert r.nic.state == "up"
    assert bytes(r.model.regs[0x10:0x16]) == NEW_MAC     # config log replayed into the new device
    r.send([frame_to(PEER_MAC, 3)])
    assert r.wire_tx == [frame_to(PEER_MAC, 3)]


def test_no_leaks_after_100_recoveries(wrig):
    def fds():
        gc.collect()            # earlier tests' objects must not close their fds mid-measurement
        return len(os.listdir("/proc/self/fd"))
    wrig.pump()
    base = (len(wrig.nic.actions), wrig.transport.in_flight(), fds())
    for i in range(100):
        entry = "xmit" if i % 2 else "set_rx_mode"
        wrig.nic.inject(entry, "raise")
        if entry == "xmit":
            wrig.nic.enqueue([frame_to(PEER_MAC, i)])
            wrig.pump(2)
        else:
            wrig.nic.set_rx_mode(RxMode(allmulti=bool(i % 4)))
        wrig.nic.guard._recent_dp_faults.clear()
    wrig.pump()
    assert wrig.nic.counters.recoveries == 100
    assert wrig.nic.counters.escalations == 0
    assert (len(wrig.nic.actions), wrig.transport.in_flight(), fds()) == base


def test_every_recovery_is_reported(wrig):
    seen = []
    wrig.nic.on_recovery_cb = seen.append
    wrig.nic.inject("xmit", "stall")
    wrig.send([frame_to(PEER_MAC, 1)])
    assert len(seen) == 1
    line = seen[0].line()
    for word in ("entry=xmit", "fault=stall", "reissued=", "recovery=", "silent="):
        assert word in line


def test_swap_to_the_alternative_implementation_after_repeated_escalations(watchdog):
    """nDriver design diversity: an implementation that keeps failing is replaced."""
    from udrv.drivers.pegasus import Pegasus
    from udrv.models.usb import ModelUsbTransport
    from udrv.models.pegasus import PegasusModel
    from udrv.nic import Nic, NicOptions

    class PegasusPrimary(Pegasus):
        pass

    class PegasusAlternative(Pegasus):
        pass

    model = PegasusModel()
    wire = []
    model.on_transmit = wire.append
    nic = Nic([PegasusPrimary, PegasusAlternative], ModelUsbTransport(model), lambda f: None,
              NicOptions(swap_after=2, config_deadline=0.2), watchdog=watchdog)
    nic.bring_up()
    nic.open()
    nic.set_mac(NEW_MAC)
    for i in range(2):
        assert type(nic.driver) is PegasusPrimary
        nic.inject("link_check", "raise", count=2)
        with pytest.raises(UdrvError):
            nic.link_check()
    assert type(nic.driver) is PegasusAlternative
    assert nic.counters.swaps == 1 and nic.status()["implementation"] == "PegasusAlternative"
    assert bytes(model.regs[0x10:0x16]) == NEW_MAC              # config replayed into the new one
    nic.enqueue([frame_to(PEER_MAC, 1)])
    for _ in range(5):
        nic.xmit()
        nic.poll(0.0)
    assert wire == [frame_to(PEER_MAC, 1)]
    nic.close()


def test_tx_error_then_success_in_one_batch_loses_nothing(rig):
    """A STALLed frame followed by completed ones must not be confirmed by their completions."""
    from udrv.usbtransport import Completion, XferStatus
    frames = [frame_to(PEER_MAC, i) for i in range(3)]
    rig.nic.enqueue(frames)
    rig.nic.xmit()
    eng = rig.nic.engine
    # what a device would report: frame 0 STALLed, frames 1 and 2 completed
    real_reap = rig.transport.reap
    rig.transport.reap = lambda timeout: [Completion(0, 0x02, XferStatus.STALL),
                                          Completion(1, 0x02, XferStatus.OK, b"", 60),
                                          Completion(2, 0x02, XferStatus.OK, b"", 60)]
    rig.nic.poll(0.0)
    rig.transport.reap = real_reap
    assert rig.nic.recoveries[-1].entry == "poll"
    rig.pump(20)
    assert frames[0] in rig.wire_tx, "the STALLed frame was confirmed by later completions and lost"
    assert rig.nic.journal.unconfirmed() == 0


def test_deadline_adapts_to_a_slow_machine(wrig):
    """A machine where calls are slow must not turn slowness into spurious hang recoveries."""
    g = wrig.nic.guard
    g.config_deadline = 0.05
    real = wrig.nic.driver.set_mtu

    def slow_set_mtu(mtu):
        time.sleep(0.03)               # a slow (starved, emulated) device: 0.03 s per call
        real(mtu)
    wrig.nic.driver.set_mtu = slow_set_mtu
    assert g.budget("set_mtu") == 0.05
    for mtu in (1400, 1401, 1402):
        wrig.nic.set_mtu(mtu)
    assert g.budget("set_mtu") >= 4 * 0.03
    assert wrig.nic.recoveries == []


def test_a_link_check_slower_than_its_short_deadline_is_retried_with_the_long_one_not_escalated(watchdog):
    """A loaded machine slows a link check past its quarter deadline: the first call on a fresh
    guard and the retry after a timeout get the configuration deadline, so slowness costs one
    retry at most and never a restart (at daemon start, a restart that fails ends the daemon)."""
    r = Rig(watchdog=watchdog, config_deadline=1.2, datapath_deadline=1.2).up()
    try:
        g = r.nic.guard
        g._avg.pop("link_check", None)                 # as before a daemon's first link check
        assert g.budget("link_check") == 1.2
        real = r.nic.driver.link_check

        def slow_link_check():
            time.sleep(0.5)                            # slow, not hung: past 0.3 s, within 1.2 s
            return real()
        r.nic.driver.link_check = slow_link_check
        r.nic.link_check()                             # first call: no recovery at all
        assert r.nic.recoveries == []
        g._avg["link_check"] = 0.001                   # a machine that was fast until now
        assert g.budget("link_check") == 0.3 and g.budget("link_check", retry=True) == 1.2
        r.nic.link_check()
        rec = r.nic.recoveries[-1]
        assert (rec.entry, rec.fault, rec.outcome) == ("link_check", "timeout", "recovered")
        assert r.nic.counters.restarts == 0
        # the retry taught the guard this machine got slower: the next slow call is no timeout
        assert g.budget("link_check") > 1.0
        n = len(r.nic.recoveries)
        r.nic.link_check()
        assert len(r.nic.recoveries) == n
    finally:
        r.nic.close()


def test_a_hung_link_check_is_caught_at_a_quarter_of_the_configuration_deadline(watchdog):
    """The daemon's loop serves no frames while a link check runs: its hang must not cost traffic
    the whole configuration deadline."""
    r = Rig(watchdog=watchdog, config_deadline=1.2, datapath_deadline=1.2).up()
    try:
        g = r.nic.guard
        r.nic.link_check()                 # as the daemon's start does: the machine's speed is known
        assert g.budget("link_check") == 0.3 and g.budget("set_mtu") == 1.2
        r.nic.inject("link_check", "hang", count=1)
        t0 = time.monotonic()
        r.nic.link_check()
        took = time.monotonic() - t0
        rec = r.nic.recoveries[-1]
        assert (rec.entry, rec.fault, rec.outcome) == ("link_check", "timeout", "recovered")
        # caught at its own deadline, not the configuration one (a bound, not a speed claim:
        # the hang itself would last 30 s)
        assert took < 1.0
    finally:
        r.nic.close()
