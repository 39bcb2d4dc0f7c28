"""Recovery conformance: every driver udrv.drivers knows, every implementation of it, every
entry point, every fault kind that applies, through udrv.nic.Nic on the driver's device model.

Each check reads the outcome where it happens: the device's configuration from the model
(conformance.py's adapters), the frames from the model's wire and the host sink, the recovery
from the Nic's report. A configuration call that faults once must end with the configuration
on the device and in the driver, recovered in process; one that faults twice must fail, leave
the old configuration, and restart the driver, which comes back up. Frames sent across a
datapath fault all reach the wire, in order, duplicated only where the journal re-issued them.

A driver without an adapter fails here, naming what to add; an implementation that cannot run
on a model is excluded by name in its adapter, with where it is covered instead.
"""
from __future__ import annotations

from typing import Any

import pytest

from conformance import ADAPTERS, BASE_MAC, BASE_MODE, GROUP_A, GROUP_B, STRANGER, Adapter, Bed, HostConfig, \
    missing_adapter, registry
from rigs import PEER_MAC, frame_to
from udrv import fastpath
from udrv.driver import NetDriver, RxMode
from udrv.errors import UdrvError

FAULT_NAMES = {"raise": "exception", "hang": "timeout", "corrupt": "invariant", "stall": "stall",
               "timeout": "device_timeout", "disconnect": "disconnect"}
DRIVER_KINDS = ("raise", "hang", "corrupt")       # the driver's own faults: every bus
OTHER_GROUP = bytes.fromhex("01005e7f0002")        # in no list: passes only all-multicast


def plan(drivers: list[tuple[str, type]], adapters: dict[str, Adapter]):
    """(adapter, implementation) pairs to run; (id, reason) of implementations not run; the
    drivers that have no adapter."""
    runs, excluded, missing = [], [], []
    for name, driver in drivers:
        adapter = adapters.get(name)
        if adapter is None:
            missing.append((name, driver))
            continue
        impls = driver.implementations()
        c = driver.c_variant()
        if c is not None and c not in impls:
            excluded.append((f"{name}-{c.__name__}", "not among DRIVER.implementations() here: the C fast "
                             f"path is not built ({fastpath.why_unavailable()}) or UDRV_DATAPATH=python"))
        for impl in impls:
            if impl.__name__ in adapter.excluded:
                excluded.append((f"{name}-{impl.__name__}", adapter.excluded[impl.__name__]))
            else:
                runs.append((adapter, impl))
    return runs, excluded, missing


RUNS, EXCLUDED, _ = plan(registry(), ADAPTERS)       # a missing adapter fails test_every_driver_has_an_adapter


# the configuration calls: case -> (entry point, its argument from the adapter and the model, or None)
CONFIG_CASES: dict[str, tuple[str, Any]] = {
    "open": ("open", None),
    "stop": ("stop", None),
    "set_mac": ("set_mac", lambda a, m: a.set_mac_to(m)),
    "set_rx_mode-promisc": ("set_rx_mode", lambda a, m: RxMode(promisc=True)),
    "set_rx_mode-multicast": ("set_rx_mode", lambda a, m: RxMode(multicast=(GROUP_A, GROUP_B))),
    "set_mtu": ("set_mtu", lambda a, m: a.mtus[1]),
    "link_check": ("link_check", None),
}
assert {e for e, _ in CONFIG_CASES.values()} == set(NetDriver.CONFIG_ENTRIES), "a configuration entry point has no case"


def _config_params() -> list:
    out = []
    for adapter, impl in RUNS:
        for case in CONFIG_CASES:
            for kind in DRIVER_KINDS + adapter.device_kinds:
                out.append(pytest.param(adapter, impl, case, kind, id=f"{adapter.driver}-{impl.__name__}-{case}-{kind}"))
    return out


def _datapath_params() -> list:
    out = []
    for adapter, impl in RUNS:
        for entry in NetDriver.DATAPATH_ENTRIES:
            for kind in ("raise", "hang") + adapter.device_kinds:       # corrupt: config entry points only
                out.append(pytest.param(adapter, impl, entry, kind,
                                        id=f"{adapter.driver}-{impl.__name__}-{entry}-{kind}"))
    return out


# --- the matrix is whole --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, _ in registry()])
def test_every_driver_has_an_adapter(name):
    driver = dict(registry())[name]
    assert name in ADAPTERS, missing_adapter(name, driver)
    assert any(a.driver == name for a, _ in RUNS), f"no implementation of {name} runs the conformance suite"


def test_a_driver_without_an_adapter_is_named_not_skipped():
    class NewDriver:
        pass
    runs, excluded, missing = plan([("newdrv", NewDriver)], ADAPTERS)
    assert (runs, excluded, missing) == ([], [], [("newdrv", NewDriver)])
    assert "newdrv" in missing_adapter("newdrv", NewDriver) and "ADAPTERS" in missing_adapter("newdrv", NewDriver)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_exclusions_name_real_implementations(name):
    driver = dict(registry()).get(name)
    assert driver is not None, f"conformance.py has an adapter for {name!r}, which udrv.drivers does not list"
    known = {driver.__name__} | ({driver.c_variant().__name__} if driver.c_variant() else set())
    assert set(ADAPTERS[name].excluded) <= known, f"{name}: excluded names no implementation: {ADAPTERS[name].excluded}"


@pytest.mark.parametrize("why", [pytest.param(why, id=i, marks=pytest.mark.skip(reason=why)) for i, why in EXCLUDED]
                         or [pytest.param("", id="none", marks=pytest.mark.skip(reason="nothing excluded"))])
def test_excluded_implementation(why):
    """Reported as skipped, with the reason and where the implementation is covered instead."""


# --- helpers --------------------------------------------------------------------------------------------
@pytest.fixture
def beds(watchdog):
    made: list[Bed] = []

    def make(adapter: Adapter, impl: type) -> Bed:
        made.append(Bed(adapter, impl, watchdog))
        return made[-1]
    yield make
    for bed in made:
        bed.close()


def configured(bed: Bed, opened: bool) -> HostConfig:
    """Bring up and configure away from the defaults (so a restart that forgot the host's
    configuration shows): another MAC, all-multicast, another MTU."""
    nic = bed.nic
    bed.bring_up()
    if opened:
        nic.open()
    nic.set_mac(BASE_MAC)
    nic.set_rx_mode(BASE_MODE)
    nic.set_mtu(bed.adapter.mtus[0])
    bed.pump()
    if opened:                  # (a closed ECM function has not told its link yet)
        assert nic.link_check() == bed.adapter.link(bed.model)
    cfg = HostConfig(BASE_MAC, BASE_MODE, bed.adapter.mtus[0], opened)
    assert_device(bed, cfg, "before any fault (the adapter's reading of a healthy device)")
    assert nic.recoveries == []
    return cfg


def assert_device(bed: Bed, cfg: HostConfig, when: str) -> None:
    want = bed.adapter.expect(bed, cfg)
    got = bed.view()
    assert {k: got[k] for k in want} == want, f"{when}: the device holds {got}, the host asked for {cfg}"


def assert_soft(bed: Bed, cfg: HostConfig) -> None:
    s = bed.nic.driver.soft
    assert (s.mac, s.mode, s.mtu, s.opened) == (cfg.mac, cfg.mode, cfg.mtu, cfg.opened), s
    assert bed.nic.driver.invariants() == []
    st = bed.nic.status()
    assert (st["mac"], st["mtu"]) == (cfg.mac.hex(":"), cfg.mtu)
    assert st["rx_mode"] == {"promisc": cfg.mode.promisc, "allmulti": cfg.mode.allmulti,
                             "multicast": [g.hex() for g in cfg.mode.multicast]}


def assert_traffic(bed: Bed, cfg: HostConfig) -> None:
    """Frames both ways as the configuration says: up to the MTU out (one byte more is dropped),
    in to the host's address and every group it joined (and anyone, promiscuous)."""
    nic = bed.nic
    if not cfg.opened:
        nic.open()
    tx = [frame_to(PEER_MAC, 900 + i) for i in range(3)] + [frame_to(PEER_MAC, 903, payload_len=cfg.mtu)]
    too_big = frame_to(PEER_MAC, 904, payload_len=cfg.mtu + 5)     # > MTU + header + a VLAN tag
    rx = [frame_to(cfg.mac, 950 + i) for i in range(3)] + [frame_to(cfg.mac, 953, payload_len=cfg.mtu)]
    rx += [frame_to(g, 960) for g in cfg.mode.multicast]
    rx += [frame_to(STRANGER, 961)] if cfg.mode.promisc else []
    rx += [frame_to(OTHER_GROUP, 962)] if cfg.mode.allmulti or cfg.mode.promisc else []
    oversize = nic.status()["tx_dropped"].get("oversize", 0)
    wire0, host0 = len(bed.wire_tx), len(bed.host_rx)
    nic.enqueue(tx[:3] + [too_big] + tx[3:])
    bed.pump()
    for f in rx:
        assert bed.model.wire_receive(f), f"the device refused a frame to {f[:6].hex(':')} ({cfg})"
        bed.pump(1)
    why = [r.line() for r in nic.recoveries]
    assert bed.wire_tx[wire0:] == tx, why
    assert bed.host_rx[host0:] == rx, why
    assert nic.status()["tx_dropped"].get("oversize", 0) == oversize + 1
    assert bed.adapter.problems(bed) == []


def call(bed: Bed, entry: str, arg: Any) -> Any:
    """The call as the daemon makes it (Nic.link_check also keeps the link it reports)."""
    nic = bed.nic
    fn = getattr(nic, entry, None) or (lambda *a: nic.configure(entry, *a))
    return fn() if arg is None else fn(arg)


def seqs(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(f[14:18], "big") for f in frames]


# --- configuration entry points ------------------------------------------------------------------------
def prepared(beds, adapter: Adapter, impl: type, case: str) -> tuple[Bed, str, HostConfig, Any]:
    """A bed configured for `case`: (bed, entry point, the host's configuration, the argument)."""
    entry, argf = CONFIG_CASES[case]
    bed = beds(adapter, impl)
    cfg = configured(bed, opened=entry != "open")
    return bed, entry, cfg, argf(adapter, bed.model) if argf else None


def finish(bed: Bed, undo: Any, cfg: HostConfig) -> None:
    """The link back as it was (where the case changed it), then traffic as `cfg` says."""
    if undo is not None:
        undo()
        bed.pump()
        bed.nic.link_check()
    assert_traffic(bed, cfg)


@pytest.mark.parametrize("adapter, impl, case, kind", _config_params())
def test_a_configuration_fault_is_rolled_back_and_the_retry_applies_it(beds, adapter, impl, case, kind):
    bed, entry, cfg, arg = prepared(beds, adapter, impl, case)
    nic = bed.nic
    want = cfg.after(entry, arg)
    undo = None
    if entry == "link_check":
        undo = adapter.change_link(bed.model)
        bed.pump()                                # what the device reports on its own (notifications)
        assert adapter.link(bed.model) != nic.link, "the link change must be one the check can see"
    elif adapter.expect(bed, want) != adapter.expect(bed, cfg):
        # where the device shows the setting, it must not hold it yet: else the check could not fail
        got, expect = bed.view(), adapter.expect(bed, want)
        assert {k: got[k] for k in expect} != expect, f"the device holds {got} already"
    resets = adapter.resets(bed)
    nic.inject(entry, kind, count=1)
    result = call(bed, entry, arg)

    assert_device(bed, want, f"after one {kind} in {entry}")
    assert_soft(bed, want)
    if entry == "link_check":
        link = adapter.link(bed.model)
        assert result == link and nic.link == link
        assert nic.status()["link"] == {"up": link.up, "speed": link.speed, "full_duplex": link.full_duplex}
    assert len(nic.recoveries) == 1, [r.line() for r in nic.recoveries]
    rec = nic.recoveries[0]
    assert (rec.entry, rec.fault, rec.outcome) == (entry, FAULT_NAMES[kind], "recovered"), rec.line()
    assert rec.soft_state_restored and rec.device_restored
    st = nic.status()
    assert (st["state"], st["recoveries"], st["escalations"], st["restarts"]) == ("up", 1, 0, 0)
    assert {k: st["last_recovery"][k] for k in ("entry", "fault", "outcome")} == \
        {"entry": entry, "fault": FAULT_NAMES[kind], "outcome": "recovered"}
    assert adapter.resets(bed) == resets, "recovered from the checkpoint: no reset, no re-probe"
    finish(bed, undo, want)


@pytest.mark.parametrize("adapter, impl, case, kind", _config_params())
def test_a_configuration_fault_twice_fails_keeps_the_old_configuration_and_restarts(beds, adapter, impl, case, kind):
    bed, entry, cfg, arg = prepared(beds, adapter, impl, case)
    nic = bed.nic
    undo = adapter.change_link(bed.model) if entry == "link_check" else None
    bed.pump()
    before, link_before, resets = bed.view(), nic.link, adapter.resets(bed)
    # the device as the guard leaves it when it gives up, before the restart rebuilds it
    at_escalation: list[dict[str, Any]] = []
    restart = nic.restart
    nic.restart = lambda: (at_escalation.append(bed.view()), restart())[1]
    nic.inject(entry, kind, count=2)
    with pytest.raises(UdrvError, match="failed twice and was rolled back"):
        call(bed, entry, arg)

    # at most once: nothing of the failed call on the device (rolled back and restored from the
    # checkpoint by the guard itself) or in the driver, and so through the restart
    assert at_escalation == [before], "the failed call left a partial effect on the device"
    assert all(r.soft_state_restored and r.device_restored for r in nic.recoveries)
    assert_device(bed, cfg, f"after two {kind} faults in {entry} and the restart")
    if entry != "link_check":                     # (the restart reads the changed link afresh)
        assert bed.view() == before
    assert_soft(bed, cfg)
    assert nic.link == link_before                # the host keeps what the last good check said
    assert [(r.entry, r.fault, r.outcome) for r in nic.recoveries] == \
        [(entry, FAULT_NAMES[kind], "retried"), (entry, FAULT_NAMES[kind], "escalated")], \
        [r.line() for r in nic.recoveries]
    # the escalation's record carries what the restart after it cost
    assert nic.recoveries[0].restart_ms is None and nic.recoveries[1].restart_ms > 0
    st = nic.status()
    assert (st["state"], st["recoveries"], st["escalations"], st["restarts"]) == ("up", 2, 1, 1)
    assert st["last_recovery"]["outcome"] == "escalated"
    assert adapter.resets(bed) > resets, "the restart probes a fresh driver"
    finish(bed, undo, cfg)


# --- datapath entry points ---------------------------------------------------------------------------------
N_FRAMES, BATCH, FAULT_AT = 300, 30, 120


def across_a_datapath_fault(bed: Bed, cfg: HostConfig, entry: str, kind: str) -> list[bytes]:
    """N_FRAMES frames out in batches, one frame in from the wire per batch, the fault injected
    into `entry` at frame FAULT_AT; then drained. Returns the frames the device took from its wire."""
    nic = bed.nic
    rx: list[bytes] = []
    for k in range(0, N_FRAMES, BATCH):
        if k == FAULT_AT:
            nic.inject(entry, kind)
        nic.enqueue([frame_to(PEER_MAC, i) for i in range(k, k + BATCH)])
        f = frame_to(cfg.mac, 10_000 + k)
        assert bed.model.wire_receive(f)
        rx.append(f)
        for _ in range(3):
            nic.xmit()
            nic.poll(0.0)
    bed.pump(50)
    return rx


@pytest.mark.parametrize("adapter, impl, entry, kind", _datapath_params())
def test_frames_sent_across_a_datapath_fault_reach_the_wire_in_order(beds, adapter, impl, entry, kind):
    bed = beds(adapter, impl)
    nic = bed.nic
    cfg = configured(bed, opened=True)
    writes = getattr(bed.transport, "device_writes", None)
    resets = adapter.resets(bed)
    across_a_datapath_fault(bed, cfg, entry, kind)

    assert len(nic.recoveries) == 1, [r.line() for r in nic.recoveries]
    rec = nic.recoveries[0]
    assert (rec.entry, rec.fault, rec.outcome) == (entry, FAULT_NAMES[kind], "recovered"), rec.line()
    # every frame reached the wire; its first copies in order; a second copy only where re-issued
    assert nic.journal.unconfirmed() == 0
    got = seqs(bed.wire_tx)
    assert sorted(set(got)) == list(range(N_FRAMES)), f"lost: {sorted(set(range(N_FRAMES)) - set(got))}"
    assert list(dict.fromkeys(got)) == list(range(N_FRAMES)), "reordered on the wire"
    dups = len(got) - N_FRAMES
    assert dups <= nic.journal.reissued == rec.reissued, (dups, nic.journal.reissued, rec.line())
    if rec.rolled_back == ["in-flight transfers kept"]:
        assert rec.reissued == 0 and dups == 0
    st = nic.status()
    # each frame counted once, however often it went out
    assert (st["tx_packets"], st["rx_packets"]) == (N_FRAMES, len(bed.host_rx))
    assert (st["recoveries"], st["escalations"], st["restarts"]) == (1, 0, 0)
    assert st["tx_journal"]["reissued"] == rec.reissued and st["tx_journal"]["unconfirmed"] == 0
    # a fault of the driver's own with nothing written to the device since the checkpoint needs
    # no restore (where the transport counts its writes); one the device reported does
    untouched = kind in ("raise", "hang") and writes is not None
    assert (rec.device_untouched, rec.device_restored) == (untouched, not untouched), rec.line()
    if writes is not None:
        assert (bed.transport.device_writes == writes) == untouched
    assert rec.silent_ms is not None                        # traffic resumed, the silence measured
    # the host's configuration survived on the device, restored from the checkpoint, not re-probed
    assert_device(bed, cfg, f"after a {kind} in {entry}")
    assert adapter.resets(bed) == resets
    assert_traffic(bed, cfg)


@pytest.mark.parametrize("adapter, impl, entry, kind", _datapath_params())
def test_frames_received_across_a_datapath_fault_reach_the_host(beds, adapter, impl, entry, kind):
    bed = beds(adapter, impl)
    rx = across_a_datapath_fault(bed, configured(bed, opened=True), entry, kind)
    assert bed.nic.recoveries[-1].entry == entry
    # what the device took from its wire reached the host, once, in order, and was counted
    assert seqs(bed.host_rx) == seqs(rx)
    assert bed.nic.status()["rx_packets"] == len(rx)
