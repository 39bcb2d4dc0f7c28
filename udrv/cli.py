"""udrv command line.

  udrv run [DEVICE]          run the supervised daemon (default: the embedded pegasus model
                             wired to a peer network namespace; model:e1000, model:cdc_ecm);
                             --impl c|python runs one implementation of the driver alone
  udrv demo                  the embedded device under iperf3 with a fault injected mid-run
  udrv status                link, MAC, counters, recoveries, last fault of a running daemon
  udrv inject ENTRY KIND     inject a fault into a running daemon's driver entry point
  udrv list                  USB and PCI NICs udrv could drive
  udrv bind BDF / unbind BDF put a PCI NIC on vfio-pci / give it back to its kernel driver
  udrv bench                 udrv vs the kernel's own driver (e1000, cdc_ether, pegasus.ko) on the same
                             devices in QEMU guests: one Markdown report + PNG (bench e1000|cdc_ecm|pegasus
                             for one of them)
  udrv bench guard           guard overhead on the model datapath (guards on / off)
  udrv bench recovery|ring|tap   recovery latency, C vs Python ring, TAP forwarding
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .errors import UdrvError
from .faults import KINDS
from .registry import EMBEDDED, IMPLS, pci_driver_for, usb_drivers
from .service import NeedsRoot, ServiceOptions, serve, setup_logging


def cmd_run(args: argparse.Namespace) -> int:
    return serve(ServiceOptions(
        device=args.device, ifname=args.ifname, guards=not args.no_guards, duration=args.duration,
        recovery=args.recovery, impl=args.impl, swap_after=args.swap_after,
        config_deadline=args.config_deadline, datapath_deadline=args.datapath_deadline,
        wire_mbit=args.wire_mbit, wire_delay_ms=args.wire_delay_ms, aqm_target_ms=args.aqm_target,
        aqm_interval_ms=args.aqm_interval, aqm_ecn=not args.aqm_no_ecn,
        isolation=False if args.in_process else None, swap_back_after=args.swap_back_after,
        give_up_after=args.give_up_after,
        heartbeat_timeout_ms=args.heartbeat_timeout))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoScenario
    scenario = DemoScenario(duration=args.seconds, faults=args.fault, ifname=args.ifname)
    # the scenario stops the daemon when it is done; the duration only bounds a stuck one
    return serve(ServiceOptions(ifname=args.ifname, duration=args.seconds + 30), scenario)


def cmd_status(args: argparse.Namespace) -> int:
    from .control import request
    r = request(args.ifname, {"cmd": "status"})
    if not r.get("ok"):
        print(f"udrv: {r.get('error')}", file=sys.stderr)
        return 1
    st = r["status"]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if "link" not in st:
        # supervised, and no worker runs the driver right now (a failover, or given up)
        print(f"{st['ifname']} (ifindex {st['ifindex']}): state {st['state']}, no worker runs the driver now")
        if st.get("last_fault"):
            print(f"  {st['last_fault']}")
        _print_domain(st)
        return 0 if st["state"] != "failed" else 1
    link = st["link"]
    print(f"{st['ifname']} (ifindex {st['ifindex']}): {st['driver']} on {st['device']}, state {st['state']}")
    print(f"  link {'up' if link['up'] else 'down'}"
          + (f" {link['speed']} Mbit/s {'full' if link['full_duplex'] else 'half'} duplex" if link["up"] else ""))
    print(f"  mac {st['mac']}  mtu {st['mtu']}")
    print(f"  rx {st['rx_packets']} packets {st['rx_bytes']} bytes, errors {st['rx_errors']}, "
          f"missed {st['rx_missed']}, dropped {st['rx_dropped'] or 0}")
    print(f"  tx {st['tx_packets']} packets {st['tx_bytes']} bytes, errors {st['tx_errors']}, "
          f"dropped {st['tx_dropped'] or 0}")
    j = st["tx_journal"]
    print(f"  tx queue {j['queued']} frames ({j['queued_bytes']} bytes) waiting for the device, "
          f"{j['in_device']} in it, {j['reissued']} re-issued after recoveries")
    if j.get("aqm_target_ms"):
        print(f"  aqm: codel target {j['aqm_target_ms']:g} ms interval {j['aqm_interval_ms']:g} ms"
              f"{'' if j['aqm_ecn'] else ' (drop only)'}: {j['aqm_drops']} dropped, {j['aqm_marks']} ECN-marked; "
              f"the oldest frame queued now waited {j['oldest_waiting_ms']:g} ms")
    else:
        print("  aqm: off: a bulk flow's queue delays every other flow (udrv aqm --target 5 turns CoDel on)")
    gro = st.get("rx_coalesce")
    if gro:
        print(f"  rx coalescing {'on' if gro['on'] else 'off'}: {gro['segments']} segments in "
              f"{gro['super_frames']} super-frames, {gro['bad_checksum']} bad checksums left alone, "
              f"{gro['refused']} refused by the TAP")
    print(f"  recoveries {st['recoveries']}, escalations {st['escalations']}, restarts {st['restarts']}")
    print(f"  last fault: {st['last_fault'] or 'none'}")
    for rec in st["recent_recoveries"][-5:]:
        silent = "n/a" if rec["silent_ms"] is None else f"{rec['silent_ms']:.2f} ms"
        print(f"    {rec['entry']}: {rec['fault']} -> {rec['outcome']}, reissued {rec['reissued']}, "
              f"recovery {rec['recovery_ms']:.2f} ms, silent {silent}")
    _print_domain(st)
    return 0


def _print_domain(st: dict[str, Any]) -> None:
    """The driver domain of a supervised daemon: worker, spare, the last failover."""
    sup = st.get("supervisor")
    if not sup:
        return                          # --in-process: one process, no domain
    w, s = st.get("worker"), st.get("spare")
    print(f"  worker {w['pid']} ({w['implementation']}, {w['state']})" if w else "  worker: none",
          f"spare {s['pid']} ({s['implementation']}, {s['state']})" if s else "spare: none",
          f"failovers {st.get('failovers', 0)}", sep=", ")
    f = st.get("last_failover")
    if f:
        fo = "n/a" if f["failover_ms"] is None else f"{f['failover_ms']:.1f} ms"
        silent = "n/a" if f["silent_ms"] is None else f"{f['silent_ms']:.1f} ms"
        print(f"  last failover: worker {f['pid']} {f['cause']}, detected by {f['detected_by']} in "
              f"{f['detection_ms']:.1f} ms, successor {f['successor'] or 'none'} up in {fo}, "
              f"{f['reissued']} frames re-issued, silent {silent}")


def cmd_aqm(args: argparse.Namespace) -> int:
    from .control import request
    req: dict[str, Any] = {"cmd": "aqm"}
    if args.target is not None:
        req["target_ms"] = args.target
    if args.interval is not None:
        req["interval_ms"] = args.interval
    if args.ecn is not None:
        req["ecn"] = args.ecn == "on"
    r = request(args.ifname, req)
    if not r.get("ok"):
        print(f"udrv: {r.get('error')}", file=sys.stderr)
        return 1
    a = r["aqm"]
    if not a["target_ms"]:
        print(f"{args.ifname}: aqm off")
    else:
        print(f"{args.ifname}: aqm codel target {a['target_ms']:g} ms interval {a['interval_ms']:g} ms "
              f"{'ecn' if a['ecn'] else 'drop only'}")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from .control import request
    if args.entry == "device":
        r = request(args.ifname, {"cmd": "device", "action": args.kind})
        if not r.get("ok"):
            print(f"udrv: {r.get('error')}", file=sys.stderr)
            return 1
        print(f"device event {args.kind} on {args.ifname}")
        return 0
    if args.entry == "worker":
        r = request(args.ifname, {"cmd": "inject", "entry": "worker", "kind": args.kind})
        if not r.get("ok"):
            print(f"udrv: {r.get('error')}", file=sys.stderr)
            return 1
        print(f"worker fault {args.kind} injected into worker {r.get('pid')} of {args.ifname}")
        return 0
    if args.kind not in KINDS:
        print(f"udrv: unknown fault kind {args.kind!r}: use one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    r = request(args.ifname, {"cmd": "inject", "entry": args.entry, "kind": args.kind, "count": args.count})
    if not r.get("ok"):
        print(f"udrv: {r.get('error')}", file=sys.stderr)
        return 1
    print(f"armed: {args.kind} in the next {args.count} call(s) of {args.entry} on {args.ifname}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .libusb import list_usb_nics
    drivers = [(c.name, c) for c in usb_drivers()]
    try:
        rows = list_usb_nics(drivers)
    except Exception as e:   # no libusb backend: say so, still list what we can
        print(f"USB: cannot enumerate ({e}); install libusb-1.0-0", file=sys.stderr)
        rows = []
    print("USB devices (udrv driver in the last column):")
    for r in rows:
        print(f"  usb:{r['id']}  bus {r['bus']} port {r['ports'] or '-'}  {r['udrv_driver'] or '-'}")
    if not rows:
        print("  none")
    from .pcibind import list_nics
    print("PCI network controllers (kernel driver, IOMMU group, udrv driver):")
    nics = list_nics()
    for n in nics:
        i = n.info
        grp = "no IOMMU group" if i.iommu_group is None else (
            f"group {i.iommu_group}" + ("" if n.group_viable else " (not viable: other devices in it are bound)"))
        cls = pci_driver_for(i.vendor, i.device)
        udrv_drv = cls.name if cls else "-"
        print(f"  pci:{i.bdf}  {i.ident}  driver {i.driver or '-'}  {grp}  {udrv_drv}")
    if not nics:
        print("  none")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    from .pcibind import bind
    n = bind(args.bdf)
    print(f"{n.bdf} ({n.info.ident}) is bound to vfio-pci (IOMMU group {n.info.iommu_group}); "
          f"run it with: udrv run pci:{n.bdf}")
    return 0


def cmd_unbind(args: argparse.Namespace) -> int:
    from .pcibind import unbind
    n = unbind(args.bdf)
    print(f"{n.bdf} ({n.info.ident}) is back on {n.info.driver or 'no driver'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what in ("sidebyside", "cdc_ecm", "pegasus"):
        from pathlib import Path
        from .bench.all import DEVICES, run_all
        only = tuple(args.only.split(",")) if args.only else DEVICES
        return run_all(Path(args.out), seconds=args.seconds, only=only if args.what == "sidebyside" else (args.what,),
                       recovery_repeats=args.repeats if args.what == "sidebyside" and not args.no_model_recovery else 0,
                       smp=args.smp)
    if args.what == "e1000":
        from pathlib import Path
        from .bench.sidebyside import FAULTS, BenchOptions, run_bench
        return run_bench(BenchOptions(out=Path(args.out), model=args.model, seconds=args.seconds,
                                      rounds=args.bench_rounds or 1, python_ring=not args.no_python_ring,
                                      no_coalesce=args.compare_no_coalesce,
                                      profile=not args.no_profile, repeats=args.repeats,
                                      faults=tuple(args.fault or FAULTS), smp=args.smp or 1))
    if args.what == "guard":
        for size in args.size or [64]:
            if args.driver == "cdc_ecm":
                print("udrv: the guard bench covers pegasus and e1000: use --driver pegasus or --driver e1000",
                      file=sys.stderr)
                return 2
            if args.driver == "e1000":
                from .bench.ring import guard_overhead_e1000
                print(guard_overhead_e1000(frames=args.frames, rounds=args.rounds, size=size).report())
            else:
                from .bench.recovery import guard_overhead
                print(guard_overhead(frames=args.frames, rounds=args.rounds, size=size).report())
        return 0
    if args.what == "aqm":
        from .bench import aqm as bench_aqm
        driver = args.driver or "pegasus"
        if driver == "e1000":
            print("udrv: the AQM bench paces a USB model's wire: use --driver pegasus or --driver cdc_ecm",
                  file=sys.stderr)
            return 2
        settings = tuple(args.aqm or bench_aqm.SETTINGS)
        runs = bench_aqm.run(settings, driver, args.ifname if args.ifname != "udrv0" else "udrvq0",
                             args.wire_mbit, args.seconds, args.bench_rounds or 2,
                             args.wire_delay_ms)
        print(bench_aqm.report(runs, driver, args.wire_mbit, args.seconds, args.wire_delay_ms))
        return 0 if all(not r.error for r in runs) else 1
    if args.what == "ring":
        from .bench.ring import ring_speed
        print(ring_speed(sizes=args.size or [64, 1500], frames=args.frames, rounds=args.rounds).report())
        return 0
    if args.what == "tap":
        from .bench.ring import tap_forward
        for size in args.size or [64]:
            print(tap_forward(frames=args.frames, rounds=args.rounds, size=size).report())
        return 0
    if args.what == "failover":
        from .bench.failover import DEFAULT_COUNTS, KINDS, failover_bench
        counts = dict(DEFAULT_COUNTS)
        if args.failovers:
            try:
                counts = {k: int(v) for k, v in (item.split("=") for item in args.failovers.split(","))}
            except ValueError:
                print("udrv: --failovers takes KIND=N,...: e.g. kill=50,segv=50,stop=20,spin=20", file=sys.stderr)
                return 2
            bad = set(counts) - set(KINDS)
            if bad:
                print(f"udrv: unknown worker fault {', '.join(sorted(bad))}: use {', '.join(KINDS)}", file=sys.stderr)
                return 2
        return failover_bench([args.driver] if args.driver else list(EMBEDDED),
                              args.ifname if args.ifname != "udrv0" else "udrvf0", counts, tcp_seconds=args.seconds)
    from .bench.recovery import recovery_latency
    return recovery_latency([args.driver] if args.driver else list(EMBEDDED),
                            args.fault or ["xmit:raise", "poll:stall", "set_rx_mode:raise"], args.repeats, args.ifname)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="udrv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the supervised daemon for one NIC")
    r.add_argument("device", nargs="?", help="usb:VID:PID, usb:BUS-PORT, pci:BDF or model:pegasus|e1000|cdc_ecm "
                                              "(default: the embedded pegasus model)")
    r.add_argument("--ifname", default="udrv0", help="TAP interface name (default udrv0)")
    r.add_argument("--no-guards", action="store_true", help="run entry points unguarded (for comparison)")
    r.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    r.add_argument("--recovery", choices=["checkpoint", "restart"], default="checkpoint",
                   help="how a fault is recovered: restore the device checkpoint (default) or restart the "
                        "driver (close, re-probe, re-open; for comparison)")
    r.add_argument("--impl", choices=IMPLS, default=None,
                   help="run this implementation of the driver alone: c (its C datapath) or python (default: "
                        "the C one when built, the Python one as the spare it swaps to)")
    r.add_argument("--swap-after", type=int, default=3, metavar="N",
                   help="escalations (in process) or worker failures within a minute (supervised) of one "
                        "implementation (C datapath, Python) before swapping to the next (default 3; 0 never "
                        "swaps: to measure one implementation's full restarts)")
    r.add_argument("--swap-back-after", type=float, default=300.0, metavar="S",
                   help="quiet seconds on the fallback implementation before the preferred one returns, as the "
                        "next spare (default 300)")
    r.add_argument("--give-up-after", type=int, default=8, metavar="N",
                   help="workers in a row that fail within 0.25 s of starting before the supervisor stops trying "
                        "(backing off between them; default 8); the interface stays, carrier off")
    r.add_argument("--heartbeat-timeout", type=float, metavar="MS",
                   default=float(os.environ.get("UDRV_HEARTBEAT_TIMEOUT_MS", "12")),
                   help="a worker whose loop neither beats nor sleeps for this long is frozen and replaced "
                        "(default 12 ms, or UDRV_HEARTBEAT_TIMEOUT_MS; raise it on an emulated or very slow "
                        "machine, where one turn of the loop takes longer)")
    r.add_argument("--config-deadline", type=float, default=1.0, metavar="S",
                   help="a configuration call running longer is a hang (default 1 s; raised automatically "
                        "above 4x the call's running average on slow machines)")
    r.add_argument("--datapath-deadline", type=float, default=1.0, metavar="S",
                   help="an xmit/poll call running longer is a hang (default 1 s)")
    r.add_argument("--wire-mbit", type=float, default=None, metavar="N",
                   help="embedded USB models: their wire runs at N Mbit/s (frames wait in the device, NAKed, "
                        "as behind a real NIC's wire; default: as fast as the host)")
    r.add_argument("--wire-delay-ms", type=float, default=0.0, metavar="MS",
                   help="with --wire-mbit: each frame reaches the peer MS later (a path beyond the LAN)")
    r.add_argument("--aqm-target", type=float, default=5.0, metavar="MS",
                   help="CoDel on the TX queue: frames that waited longer than this for a whole interval "
                        "are dropped or ECN-marked (default 5 ms, as fq_codel; 0 turns it off)")
    r.add_argument("--aqm-interval", type=float, default=100.0, metavar="MS",
                   help="CoDel's interval: about the longest RTT of the flows through the NIC (default 100 ms)")
    r.add_argument("--aqm-no-ecn", action="store_true", help="drop rather than ECN-mark ECN-capable frames")
    r.add_argument("--in-process", action="store_true",
                   help="run the driver in this process, without a worker, a warm spare or a supervisor (as "
                        "UDRV_ISOLATION=0; for comparison and benches: a crash of the driver then ends udrv)")
    r.set_defaults(fn=cmd_run)

    q = sub.add_parser("aqm", help="show or change a running daemon's CoDel settings on its TX queue")
    q.add_argument("--target", type=float, default=None, metavar="MS", help="0 turns it off")
    q.add_argument("--interval", type=float, default=None, metavar="MS")
    q.add_argument("--ecn", choices=["on", "off"], default=None, help="off: drop rather than mark")
    q.add_argument("--ifname", default="udrv0")
    q.set_defaults(fn=cmd_aqm)

    d = sub.add_parser("demo", help="embedded device + iperf3 + a fault injected mid-run")
    d.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration (default 10)")
    d.add_argument("--fault", action="append", default=None, metavar="ENTRY:KIND",
                   help=f"fault to inject mid-run (repeatable; default xmit:raise, poll:stall, set_rx_mode:raise and worker:segv); "
                        f"kinds: {', '.join(KINDS)}")
    d.add_argument("--ifname", default="udrv0")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("status", help="show a running daemon's state and counters")
    s.add_argument("--ifname", default="udrv0")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    i = sub.add_parser("inject", help="inject a fault into a running daemon")
    i.add_argument("entry", help="entry point: open, stop, set_mac, set_rx_mode, set_mtu, link_check, xmit, poll; "
                                  "'device' for a physical event on the embedded model; 'worker' for a fault of the worker process")
    i.add_argument("kind", help=f"fault kind: {', '.join(KINDS)}; with 'device': unplug, replug, link-down, "
                                "link-up, garbage:<kind>; with 'worker': kill, stop, segv, spin (a C busy loop), hang (a C "
                                "call that never returns), exit")
    i.add_argument("--count", type=int, default=1, help="calls that fault (1 = transient, 2 = the retry fails too)")
    i.add_argument("--ifname", default="udrv0")
    i.set_defaults(fn=cmd_inject)

    ls = sub.add_parser("list", help="list NICs udrv can drive")
    ls.set_defaults(fn=cmd_list)

    bd = sub.add_parser("bind", help="put a PCI NIC on vfio-pci (remembers its kernel driver)")
    bd.add_argument("bdf", help="PCI address, e.g. 0000:03:00.0")
    bd.set_defaults(fn=cmd_bind)
    ub = sub.add_parser("unbind", help="give a PCI NIC back to its kernel driver")
    ub.add_argument("bdf")
    ub.set_defaults(fn=cmd_unbind)

    b = sub.add_parser("bench", help="benchmarks (ratios measured in one run)")
    b.add_argument("what", nargs="?", default="sidebyside",
                   choices=["sidebyside", "e1000", "cdc_ecm", "pegasus", "guard", "recovery", "ring", "tap", "aqm",
                            "failover"],
                   help="sidebyside (the default): udrv vs the kernel's own driver for e1000, cdc_ecm and pegasus, "
                        "one QEMU guest boot per device, one report (root, QEMU; ~15 min); cdc_ecm, pegasus: one "
                        "of those alone; guard: guard overhead on the model datapath (--driver pegasus|e1000); recovery: "
                        "interruption per fault, checkpoint recovery vs full restart (root); e1000: udrv vs the "
                        "kernel's driver on QEMU's e1000 in one kernel-tier guest boot, throughput + recovery "
                        "latency (root, QEMU); ring: the C e1000 ring vs the Python ring, TX and RX, device side "
                        "stubbed; tap: frames read from a TAP and written back to it through udrv's C path vs a bare C "
                        "loop (root); aqm: latency under load through an embedded USB model whose wire is the "
                        "bottleneck (--wire-mbit), CoDel on / off / other settings (--aqm; root); failover: the worker "
                        "killed, crashed, stopped and spun under iperf3 on each embedded model, interruption / "
                        "detection / failover percentiles, TX frames lost at the peer, leaks, supervised / "
                        "in-process TCP (root; ~8 min)")
    b.add_argument("--failovers", default=None, metavar="KIND=N,...",
                   help="failover: worker faults per driver (default kill=50,segv=50,stop=20,spin=20)")
    b.add_argument("--wire-mbit", type=float, default=100.0, metavar="N",
                   help="aqm: the embedded model's wire rate (default 100, a Pegasus II's)")
    b.add_argument("--wire-delay-ms", type=float, default=20.0, metavar="MS",
                   help="aqm: the delay each TX frame takes to reach the peer (default 20: a path beyond the LAN, "
                        "where TCP's window outgrows the wire; 0 = a LAN)")
    b.add_argument("--aqm", action="append", default=None, metavar="SETTING",
                   help="aqm: a UDRV_AQM setting to run (repeatable; default: on, off, 1/10)")
    b.add_argument("--repeats", type=int, default=10, help="injections per fault (recovery; sidebyside's model-tier "
                                                               "recovery section)")
    b.add_argument("--no-model-recovery", action="store_true",
                   help="sidebyside: leave out the model-tier recovery latency section (~2 min on the host)")
    b.add_argument("--fault", action="append", default=None, metavar="ENTRY:KIND")
    b.add_argument("--ifname", default="udrv0")
    b.add_argument("--frames", type=int, default=20000,
                   help="frames per round (ring: for the Python ring; the C ring runs 10x as many)")
    b.add_argument("--rounds", type=int, default=7)
    b.add_argument("--size", type=int, action="append", default=None, metavar="BYTES",
                   help="frame size, repeatable (default 64; ring: 64 and 1500)")
    b.add_argument("--driver", choices=list(EMBEDDED), default=None,
                   help="guard: which driver's datapath (pegasus or e1000; default pegasus); recovery: only this "
                        "driver on its embedded model (default: all of them)")
    b.add_argument("--out", default="bench-out", help="side-by-sides: report directory (default ./bench-out)")
    b.add_argument("--only", default=None, metavar="DEV,DEV",
                   help="sidebyside: only these devices (e1000, cdc_ecm, pegasus)")
    b.add_argument("--model", choices=["e1000", "e1000e"], default="e1000", help="e1000: QEMU device model")
    b.add_argument("--seconds", type=float, default=5.0, help="side-by-sides and aqm: seconds per iperf3 run")
    b.add_argument("--bench-rounds", type=int, default=None,
                   help="e1000: iperf3 runs per measurement (median; default 1); aqm: runs of each setting (default 2)")
    b.add_argument("--smp", type=int, default=None,
                   help="side-by-sides: guest vCPUs (default 1 for e1000 as the reference baselines; 2 for the USB "
                        "devices, whose gadget runs in the same guest)")
    b.add_argument("--no-python-ring", action="store_true", help="e1000: skip the Python ring")
    b.add_argument("--no-profile", action="store_true", help="e1000: skip the py-spy pass")
    b.add_argument("--compare-no-coalesce", action="store_true",
                   help="e1000: also run the C ring with RX coalescing off (same guest boot)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.fn(args)
    except NeedsRoot as e:
        print(e, file=sys.stderr)
        return 2
    except UdrvError as e:
        print(f"udrv: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
