"""The supervised daemon as a function: `serve(ServiceOptions(device=..., ...))`.

One device, one TAP, one Nic under the daemon's loop until the duration ends, a signal stops it or
a scenario does. `udrv run`, `udrv demo` and the benches (recovery latency, the e1000 side-by-side
in its guest) call it, so every daemon they measure is the one users run.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import UdrvError

log = logging.getLogger("udrv")


class NeedsRoot(UdrvError):
    """The daemon creates a TAP (and, for an embedded model, a network namespace)."""


@dataclass(frozen=True)
class ServiceOptions:
    device: str | None = None           # usb:…, pci:…, model:NAME; None = the embedded pegasus model
    ifname: str = "udrv0"
    guards: bool = True                 # False: entry points unguarded (for comparison)
    duration: float | None = None       # seconds; None = until a signal
    recovery: str = "checkpoint"        # or "restart": close, re-probe, re-open (for comparison)
    impl: str | None = None             # None: every implementation, best first; "c" / "python": that one alone
    swap_after: int = 3                 # escalations before the next implementation; 0 = never swap
    config_deadline: float = 1.0        # seconds
    datapath_deadline: float = 1.0      # seconds
    wire_mbit: float | None = None      # embedded USB models: pace their wire
    wire_delay_ms: float = 0.0
    aqm_target_ms: float = 5.0          # CoDel on the TX queue; 0 = off
    aqm_interval_ms: float = 100.0
    aqm_ecn: bool = True
    # the driver in a worker process beside a warm spare, under a supervisor (udrv/supervisor.py);
    # False: one process, as before (for comparison and benches); None: on unless UDRV_ISOLATION=0
    isolation: bool | None = None
    swap_back_after: float = 300.0      # quiet seconds on a fallback implementation before the preferred returns
    give_up_after: int = 8              # workers in a row that fail at once before the supervisor stops trying
    heartbeat_timeout_ms: float = 12.0  # a worker whose loop neither beats nor sleeps this long is frozen

    def isolated(self) -> bool:
        if self.isolation is not None:
            return self.isolation
        return os.environ.get("UDRV_ISOLATION", "1") != "0"


class Scenario(Protocol):
    """Something that runs beside the daemon's loop (a demo, a bench) and stops it when done."""
    exit_code: int

    def start(self, daemon: Any, peer: Any) -> None: ...


def serve(opts: ServiceOptions, scenario: Scenario | None = None) -> int:
    """Run the daemon; 0 when it stopped as asked, else the scenario's exit code.

    Raises NeedsRoot without root, UdrvError when the device cannot be opened or the daemon fails."""
    from .daemon import Daemon, install_signal_handlers
    from .guard import Watchdog
    from .nic import Nic, NicOptions
    from .peer import PeerConfig, PeerWire, ip
    from .registry import open_device
    from .tap import Tap

    if os.geteuid() != 0:
        raise NeedsRoot("udrv run needs root (it creates a TAP interface and, for the embedded device, a network "
                        "namespace): run it with sudo")
    if opts.isolated():
        return supervise(opts, scenario)
    impls, transport, model = open_device(opts.device, wire_mbit=opts.wire_mbit,
                                          wire_delay_ms=opts.wire_delay_ms, impl=opts.impl)
    tap = Tap(opts.ifname)
    peer = None
    extra: dict[int, Any] = {}
    if model is not None:
        peer = PeerWire(PeerConfig.for_interface(opts.ifname))
        peer.connect(model)
        extra[peer.fd] = peer.pump
    wire = None
    if opts.wire_mbit is not None:        # a paced wire (udrv.models.wire) in front of the model
        wire = transport.model
        if peer is not None:
            wire.delay_transmit()
    reopen = None
    from .libusb import LibusbTransport
    if isinstance(transport, LibusbTransport):
        # after an unplug the device comes back as a new USB device: find it the same way
        reopen = lambda: LibusbTransport(transport.selector, context=transport.ctx)  # noqa: E731
    nic = Nic(impls, transport, tap.write,
              NicOptions(guards=opts.guards, recovery=opts.recovery,
                         config_deadline=opts.config_deadline, datapath_deadline=opts.datapath_deadline,
                         swap_after=opts.swap_after or 1 << 30,
                         aqm_target=opts.aqm_target_ms / 1e3, aqm_interval=opts.aqm_interval_ms / 1e3,
                         aqm_ecn=opts.aqm_ecn),
              watchdog=Watchdog(),
              reopen=reopen)
    daemon = Daemon(nic, tap, extra_fds=extra, model=model)
    install_signal_handlers(daemon)
    try:
        daemon.start()
        if peer is not None:
            ip("addr", "add", peer.cfg.host_ip, "dev", tap.name, check=False)
            log.info("event=embedded-device model=%s host=%s peer=%s netns=%s (try: ip netns exec %s iperf3 -s)",
                     type(model).__name__, peer.cfg.host_addr, peer.cfg.peer_addr, peer.cfg.netns, peer.cfg.netns)
        if scenario is not None:
            scenario.start(daemon, peer)
        daemon.run(opts.duration)
    finally:
        daemon.close()
        if wire is not None:
            wire.close()                  # its thread wakes the transport: stopped first
        transport.close()
        tap.close()
        if peer is not None:
            peer.close()
    return 0 if scenario is None else scenario.exit_code


def supervise(opts: ServiceOptions, scenario: Scenario | None = None) -> int:
    """The supervised daemon: supervisor here, the driver in a worker with a warm spare, an
    embedded model in a device process of its own."""
    import signal

    from .models.catalog import BUS, EMBEDDED
    from .peer import PeerConfig, PeerNamespace, ip
    from .failover import Policy
    from .supervisor import Supervisor

    spec = opts.device or "model:pegasus"
    kind = spec.removeprefix("model:")
    if spec.startswith("usb:"):
        from .libusb import UsbSelector
        if opts.wire_mbit is not None:
            raise UdrvError("--wire-mbit sets the wire of an embedded model (model:pegasus, model:cdc_ecm); a real "
                            "device's wire runs at its link speed")
        try:
            UsbSelector.parse(spec)
        except ValueError as e:
            raise UdrvError(str(e)) from None
        device: dict[str, Any] = {"kind": "usb", "spec": spec}
    elif spec.startswith("pci:"):
        from .pcibind import normalize_bdf
        if opts.wire_mbit is not None:
            raise UdrvError("--wire-mbit sets the wire of an embedded model (model:pegasus, model:cdc_ecm); a real "
                            "device's wire runs at its link speed")
        try:
            bdf = normalize_bdf(spec.removeprefix("pci:"))
        except ValueError as e:
            raise UdrvError(str(e)) from None
        device = {"kind": "pci", "spec": spec, "bdf": bdf}
    elif not spec.startswith("model:"):
        raise UdrvError(f"{spec!r} names no device: use usb:VID:PID, usb:BUS-PORT, pci:BDF or "
                        "model:" + "|".join(EMBEDDED))
    elif kind not in EMBEDDED:
        raise UdrvError(f"no embedded model called {kind!r}: use one of " + ", ".join(f"model:{k}" for k in EMBEDDED))
    elif opts.impl == "c" and BUS[kind] == "usb":
        raise UdrvError(f"model:{kind} runs the Python engines (the C USB ring moves its transfers through "
                        "libusb, which an embedded model is not behind): use --impl python, or a usb: device")
    else:
        device = {"kind": "model", "model": kind, "spec": spec, "wire_mbit": opts.wire_mbit,
                  "wire_delay_ms": opts.wire_delay_ms}
    options = {"guards": opts.guards, "recovery": opts.recovery, "config_deadline": opts.config_deadline,
               "datapath_deadline": opts.datapath_deadline, "swap_after": opts.swap_after or 1 << 30,
               "aqm_target": opts.aqm_target_ms / 1e3, "aqm_interval": opts.aqm_interval_ms / 1e3,
               "aqm_ecn": opts.aqm_ecn}
    policy = Policy(swap_after=opts.swap_after or 1 << 30, swap_back_after=opts.swap_back_after,
                    give_up_after=max(1, opts.give_up_after)).with_heartbeat(opts.heartbeat_timeout_ms / 1e3)
    sup = Supervisor(device, options, opts.ifname, policy=policy, impl=opts.impl)
    signal.signal(signal.SIGINT, sup.stop)
    signal.signal(signal.SIGTERM, sup.stop)
    try:
        sup.start()
        peer = None
        if device["kind"] == "model":
            cfg = PeerConfig.for_interface(opts.ifname)
            ip("addr", "add", cfg.host_ip, "dev", sup.tap.name, check=False)
            log.info("event=embedded-device model=%s host=%s peer=%s netns=%s (try: ip netns exec %s iperf3 -s)",
                     kind, cfg.host_addr, cfg.peer_addr, cfg.netns, cfg.netns)
            peer = PeerNamespace(cfg)
        if scenario is not None:
            scenario.start(sup, peer)
        sup.run(opts.duration)
    finally:
        sup.close()
    return 0 if scenario is None else scenario.exit_code


def setup_logging(verbose: bool = False) -> None:
    """The daemon's log format on stderr (what `udrv` prints; benches' daemons log the same way)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s udrv %(levelname)s %(message)s", stream=sys.stderr)
