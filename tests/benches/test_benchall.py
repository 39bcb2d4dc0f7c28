"""`udrv bench` (the side-by-side of every device): results of the three guest benches become one
table of udrv/kernel ratios, one report and one chart. The guest runs themselves are benchmarks
(minutes each), not tests; here the parts that turn their results into verdicts are checked."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from udrv.bench import all as benchall
from udrv.bench.all import DeviceResult, Row, cdc_ecm_rows, e1000_rows, pegasus_rows
from udrv.cli import build_parser


def e1000_result() -> dict:
    def case(label: str, tx: float, rx: float, u_tx: float, u_rx: float) -> dict:
        return {"_label": label, "tcp_tx": {"value": tx}, "tcp_rx": {"value": rx},
                "udp64_tx": {"value": u_tx}, "udp64_rx": {"value": u_rx}}
    return {"kernel_release": "6.1.0-test", "cases": {
        "kernel": case("kernel e1000", 2000.0, 2600.0, 40.0, 30.0),
        "udrv_c": case("udrv C ring", 1900.0, 1300.0, 44.0, 15.0),
        "kernel_after": case("kernel e1000, again", 2200.0, 2400.0, 40.0, 30.0)}}


def test_e1000_rows_use_the_mean_of_the_bracketing_kernel_runs():
    rows = {r.measurement: r for r in e1000_rows(e1000_result())}
    assert set(rows) == {"TCP host -> peer", "TCP peer -> host", "UDP 64 B host -> peer", "UDP 64 B peer -> host"}
    tx = rows["TCP host -> peer"]
    assert tx.kernel == pytest.approx(2100.0)
    assert tx.ratio == pytest.approx(1900 / 2100)
    assert tx.met                                    # 0.905 >= 0.9
    assert not rows["TCP peer -> host"].met          # 0.52
    assert rows["UDP 64 B host -> peer"].ratio == pytest.approx(1.1)
    assert tx.variant == "C ring"


def test_cdc_ecm_rows_keep_a_failed_datapath_as_failed_not_as_zero():
    res = {"kernel": {"tx": 500.0, "rx": 400.0},
           "native": {"tx": 460.0, "rx": 200.0},
           "python": {"error": "RuntimeError: timed out waiting for udrv (python)", "log": "..."}}
    rows = cdc_ecm_rows(res)
    native = {r.measurement: r for r in rows if r.variant == "C ring (udrv run)"}
    assert native["TCP host -> peer"].ratio == pytest.approx(0.92)
    assert native["TCP host -> peer"].met and not native["TCP peer -> host"].met
    failed = [r for r in rows if r.variant == "Python engine"]
    assert len(failed) == 2 and all(r.udrv is None and math.isnan(r.ratio) and not r.met for r in failed)
    assert "timed out" in failed[0].error
    assert cdc_ecm_rows({"error": "no gadget"}) == []


def test_pegasus_rows_pair_each_udrv_run_with_the_kernel_run_of_the_same_direction():
    runs = [{"path": "pegasus.ko", "direction": "host->peer (TX)", "mbit_s": 100.0},
            {"path": "pegasus.ko", "direction": "peer->host (RX)", "mbit_s": 80.0},
            {"path": "pegasus.ko", "direction": "UDP 60B peer->host", "error": "iperf3 failed"},
            {"path": "udrv", "direction": "host->peer (TX)", "mbit_s": 130.0},
            {"path": "udrv", "direction": "peer->host (RX)", "mbit_s": 60.0},
            {"path": "udrv", "direction": "UDP 60B peer->host", "mbit_s": 2000.0}]
    rows = pegasus_rows({"runs": runs})
    assert [(r.measurement, round(r.ratio, 3)) for r in rows] == [("host -> peer (TX)", 1.3),
                                                                 ("peer -> host (RX)", 0.75)]
    assert rows[0].met and not rows[1].met          # pegasus must beat the kernel: target 1.0


def test_a_rate_test_where_both_drivers_carry_all_that_was_offered_gives_no_verdict():
    runs = [{"path": "pegasus.ko", "direction": "UDP 60B host->peer", "mbit_s": 2990.0},
            {"path": "pegasus.ko", "direction": "UDP 60B peer->host", "mbit_s": 2100.0},
            {"path": "udrv", "direction": "UDP 60B host->peer", "mbit_s": 2980.0},
            {"path": "udrv", "direction": "UDP 60B peer->host", "mbit_s": 2900.0}]
    capped, found = pegasus_rows({"runs": runs}, offered_pps=3000)
    assert capped.saturated_by_offer and "no limit found" in capped.verdict and not capped.met
    assert not found.saturated_by_offer and found.verdict == "met"      # the kernel fell short of the offer


def test_cdc_ecm_kernel_reference_is_the_mean_of_the_runs_before_and_after_udrv():
    rows = cdc_ecm_rows({"kernel": {"tx": 100.0, "rx": 200.0}, "kernel_after": {"tx": 300.0, "rx": 200.0},
                         "native": {"tx": 180.0, "rx": 100.0}})
    assert [(r.kernel, round(r.ratio, 2)) for r in rows] == [(200.0, 0.9), (200.0, 0.5)]


def test_report_and_chart_from_all_three_and_a_failed_device(tmp_path: Path):
    e = DeviceResult("e1000", rows=e1000_rows(e1000_result()), raw=e1000_result(), guest_seconds=300)
    c = DeviceResult("cdc_ecm", rows=cdc_ecm_rows({"kernel": {"tx": 500.0, "rx": 400.0},
                                                    "native": {"tx": 460.0, "rx": 200.0}}))
    p = DeviceResult("pegasus", error="the guest failed: QEMU is not installed: apt-get install qemu-system-x86")
    report = benchall.write_outputs([e, c, p], {"seconds": 5, "kernel": "6.1.0-test"}, tmp_path)
    assert (tmp_path / "report.md").read_text() == report
    summary = [line for line in report.splitlines() if line.startswith("| e1000 | TCP peer -> host")]
    assert summary and "**0.52**" in summary[0] and "below" in summary[0]
    assert "| cdc_ecm | TCP host -> peer | cdc_ether | 500 Mbit/s | C ring (udrv run) | 460 | **0.92** | 0.9 | met |" in report
    assert "| pegasus |" in report and "failed: the guest failed: QEMU is not installed" in report
    assert (tmp_path / "sidebyside.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["devices"]["cdc_ecm"]["rows"][0]["ratio"] == pytest.approx(0.92)
    assert saved["devices"]["pegasus"]["error"].startswith("the guest failed")


def test_cdc_ecm_details_show_where_the_cpu_went():
    raw = {"kernel_cpu": {"tx": {"guest_busy": 0.97, "daemon_user": None, "daemon_sys": None}},
           "native_cpu": {"tx": {"guest_busy": 0.99, "vcpus": 2, "daemon_user": 0.12, "daemon_sys": 0.55,
                                 "daemon_threads": {"udrv-ring-tx": 0.41, "main": 0.26}}},
           "native_unavailable": "udrv._native is not built"}
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert "| cdc_ether | tx | 0.97 | - | - | - |" in text
    assert "| C ring (udrv run) | tx | 0.99 | 0.12 | 0.55 | udrv-ring-tx 0.41, main 0.26 |" in text
    assert "all the guest's 2 vCPUs" in text
    assert "C transfer ring not measured: udrv._native is not built" in text


def test_udrv_bench_without_an_argument_is_the_side_by_side_of_every_device():
    args = build_parser().parse_args(["bench"])
    assert args.what == "sidebyside" and args.only is None and args.smp is None
    args = build_parser().parse_args(["bench", "--only", "cdc_ecm,pegasus", "--seconds", "3"])
    assert args.only == "cdc_ecm,pegasus" and args.seconds == 3.0


def test_an_unknown_device_is_refused_with_the_choices():
    with pytest.raises(Exception, match="choose from e1000, cdc_ecm, pegasus"):
        benchall.run_all(Path("/nonexistent"), only=("rtl8139",))


def test_row_without_kernel_value_has_no_ratio():
    assert math.isnan(Row("e1000", "x", "Mbit/s", 0.0, 10.0, "C ring").ratio)



def test_the_model_tier_recovery_section_follows_the_devices(tmp_path: Path):
    c = DeviceResult("cdc_ecm", rows=cdc_ecm_rows({"kernel": {"tx": 500.0, "rx": 400.0},
                                                    "native": {"tx": 460.0, "rx": 200.0}}))
    table = "### e1000\n\n| fault | n |\n|---|---|\n| xmit:raise | 10 |"
    report = benchall.write_outputs([c], {"seconds": 5, "model_recovery": table, "model_recovery_repeats": 10,
                                          "model_recovery_load": 0.3}, tmp_path)
    head, _, tail = report.partition("## Recovery latency, every driver on its embedded model")
    assert "## cdc_ecm vs cdc_ether" in head and "--repeats 10" in tail and "load average 0.3" in tail
    assert tail.rstrip().endswith("| xmit:raise | 10 |")
    # without it (one device alone, or --no-model-recovery) there is no such section
    assert "Recovery latency, every driver" not in benchall.write_outputs([c], {"seconds": 5}, tmp_path)
    args = build_parser().parse_args(["bench", "--no-model-recovery"])
    assert args.no_model_recovery and args.repeats == 10


def test_cdc_ecm_details_compare_checkpoint_with_full_restart_on_the_gadget():
    def run(mode, gaps, recovery_ms, daemon_ms):
        return {"mode": mode, "impl": "c", "sent": 1000, "received": 990, "duplicates": 0, "baseline_gap_ms": 3.0,
                "gaps_ms": {"xmit:raise": gaps}, "per_fault": {"xmit:raise": {
                    "recovery_ms": recovery_ms, "daemon_ms": daemon_ms, "restore_ms": [1.0, 2.0, 3.0],
                    "datapath_ms": [4.0, 4.0, 4.0], "silent_ms": [], "outcomes": []}},
                "spacing_s": {"xmit:raise": 0.7}, "recoveries": 3, "escalations": 0, "restarts": 0,
                "implementation": "CdcEcmNative"}
    raw = {"recovery": [run("checkpoint", [10.0, 20.0, 30.0], [5.0, 6.0, 7.0], [5.0, 6.0, 7.0]),
                        run("restart", [200.0, 200.0, 200.0], [1.0, 1.0, 1.0], [101.0, 101.0, 101.0]),
                        {"mode": "other", "error": "UdrvError: the daemon did not come up"}]}
    text = "\n".join(benchall.cdc_ecm_details(raw))
    # no idle:none row in these runs: nothing to take off, so no above-the-floor figure
    assert "| xmit:raise | 3 | 20.0 | 30.0 | 200.0 | 200.0 | 90% | - | 6.0 (2.0 + 4.0) / 101.0 | 94% |" in text
    assert "other run failed: UdrvError: the daemon did not come up" in text
    assert "--swap-after 0" in text


def test_recovery_rows_also_compare_what_each_fault_added_above_the_idle_floor():
    from udrv.bench.sidebyside import IDLE_CONTROL, recovery_table, shorter_above_floor

    def run(mode, idle, gaps):
        return {"mode": mode, "sent": 10, "received": 10, "baseline_gap_ms": 1.0, "recoveries": 3,
                "escalations": 0, "restarts": 0, "implementation": "X", "per_fault": {},
                "gaps_ms": {IDLE_CONTROL: idle, "poll:stall": gaps}}
    # checkpoint 9 over an idle 7 adds 2; the restart 47 over an idle 7 adds 40: 95% shorter,
    # where the raw p50s (9 vs 47) give 81%
    text = "\n".join(recovery_table([run("checkpoint", [7.0, 7.0, 8.0], [9.0, 9.0, 12.0]),
                                     run("restart", [6.0, 7.0, 7.0], [40.0, 47.0, 50.0])]))
    assert "| poll:stall | 3 | 9.0 | 12.0 | 47.0 | 50.0 | 81% | 95% | - | - |" in text
    assert f"| {IDLE_CONTROL} | 3 | 7.0 | 8.0 | 7.0 | 7.0 | - | - |" in text
    # a checkpoint gap under its floor adds nothing (100%); a restart that adds nothing gives no figure
    assert shorter_above_floor([5.0], [30.0], [6.0], [6.0]) == "100%"
    assert shorter_above_floor([5.0], [6.0], [6.0], [6.0]) == "-"
    # a restart that adds under a millisecond to its floor is noise: no ratio of it
    assert shorter_above_floor([2.5], [2.3], [1.8], [1.6]) == "-"
    assert shorter_above_floor([2.0], [3.0], [1.8], [1.6]) == "86%"
    assert shorter_above_floor([5.0], [30.0], [], [6.0]) == "-"


def test_udrv_run_swap_after_zero_never_swaps():
    args = build_parser().parse_args(["run", "model:cdc_ecm", "--swap-after", "0"])
    assert args.swap_after == 0
    assert build_parser().parse_args(["run"]).swap_after == 3


def test_cdc_ecm_rounds_compare_medians_of_alternating_runs():
    res = {"kernel": {"tx": 100.0, "rx": 100.0}, "kernel_more": [{"tx": 200.0, "rx": 100.0}, {"tx": 150.0, "rx": 100.0}],
           "kernel_after": {"tx": 400.0, "rx": 100.0},
           "native": {"tx": 90.0, "rx": 50.0}, "native_more": [{"tx": 180.0, "rx": 300.0}, {"tx": 120.0, "rx": 90.0}],
           "python": {"tx": 10.0, "rx": 10.0}}
    rows = cdc_ecm_rows(res)
    got = {(r.variant, r.measurement): (r.kernel, r.udrv) for r in rows}
    assert got[("C ring (udrv run)", "TCP host -> peer")] == (175.0, 120.0)    # medians of 4 and of 3 runs
    assert got[("C ring (udrv run)", "TCP peer -> host")] == (100.0, 90.0)
    assert got[("Python engine", "TCP host -> peer")] == (175.0, 10.0)          # one run: itself
    text = "\n".join(benchall.cdc_ecm_details(res))
    assert "| cdc_ether, round 2 | 200.0 | 100.0 |" in text and "| C ring (udrv run), round 3 | 120.0 | 90.0 |" in text
    assert text.index("cdc_ether, round 3") < text.index("cdc_ether, again at the end")


def test_pegasus_rows_compare_the_medians_of_alternating_rounds():
    runs = [{"path": "pegasus.ko", "direction": "host->peer (TX)", "mbit_s": x, "round": n}
            for n, x in ((1, 20.0), (2, 40.0), (3, 30.0))]
    runs += [{"path": "udrv", "direction": "host->peer (TX)", "mbit_s": x, "round": n} for n, x in ((1, 30.0), (2, 36.0))]
    runs += [{"path": "udrv", "direction": "peer->host (RX)", "error": "iperf3 failed", "round": 1},
             {"path": "pegasus.ko", "direction": "peer->host (RX)", "mbit_s": 10.0, "round": 1}]
    tx, rx = pegasus_rows({"runs": runs})
    assert (tx.kernel, tx.udrv, round(tx.ratio, 2)) == (30.0, 33.0, 1.1)    # one row per direction: medians
    assert rx.udrv is None and rx.error == "iperf3 failed"


def test_the_model_tier_table_has_the_above_the_floor_column_too():
    from udrv.bench.recovery import RecoveryLatency, recovery_report
    ck = RecoveryLatency("checkpoint", "e1000", gaps={"none (control)": [1.5, 1.6, 1.7], "set_rx_mode:raise": [2.2, 2.2, 2.4]})
    rs = RecoveryLatency("restart", "e1000", gaps={"none (control)": [1.7, 1.7, 1.8], "set_rx_mode:raise": [21.1, 21.1, 21.6]})
    text = recovery_report([ck, rs])
    # raw: 1 - 2.2/21.1 = 90%; above each run's control p50: 1 - 0.6/19.4 = 97%
    assert "| set_rx_mode:raise | 3 | 2.2 ms | 2.4 ms | 21.1 ms | 21.6 ms | 90% | 97% |" in text
    assert "| none (control) | 3 | 1.6 ms | 1.7 ms | 1.7 ms | 1.8 ms | - | - |" in text


def test_the_usbfs_floor_is_set_beside_the_daemons_cost_per_frame():
    raw = {"native": {"tx": 121.1, "rx": 150.0},
           "native_cpu": {"tx": {"guest_busy": 0.8, "daemon_user": 0.25, "daemon_sys": 0.55}},
           "usbfs_floor": {"frames": 60000, "errors": 0, "seconds": 4.0, "frames_per_s": 15000.0, "mbit_s": 181.7,
                           "us_per_frame_user": 8.0, "us_per_frame_sys": 32.0}}
    text = "\n".join(benchall.cdc_ecm_details(raw))
    # 121.1 Mbit/s = 10000 frames/s of 1514 bytes; 0.8 s of CPU per second = 80 us per frame
    assert "15000 frames/s (182 Mbit/s), 40.0 µs of CPU per frame (8.0 user + 32.0 system)" in text
    assert "80.0 µs per 1514-byte frame sent" in text and "usbfs alone is 50% of it" in text
    failed = "\n".join(benchall.cdc_ecm_details({"usbfs_floor": {"error": "UdrvError: no device"}}))
    assert "usbfs floor not measured: UdrvError: no device" in failed


def test_the_tx_cpu_budget_says_what_udrv_would_need_at_nine_tenths_of_the_kernel():
    def run(tx: float, busy: float) -> tuple[dict, dict]:
        return {"tx": tx, "rx": 1.0}, {"tx": {"guest_busy": busy, "vcpus": 2}}
    raw = {}
    # 121.1 Mbit/s = 10000 frames/s of 1514 bytes: 0.6 of 2 vCPUs = 120 us per frame
    raw["kernel"], raw["kernel_cpu"] = run(121.12, 0.6)
    raw["kernel_after"], raw["kernel_after_cpu"] = run(121.12, 0.6)
    raw["native"], raw["native_cpu"] = run(96.896, 0.8)            # 8000 frames/s, 200 us per frame
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert "cdc_ether 120 µs at 10000 frames/s, udrv 200 µs at 8000 frames/s" in text
    # 0.9 x 10000 frames/s x 200 us = 1.8 vCPUs: within the guest's 2
    assert "(9000 frames/s) udrv's cost per frame would keep 1.80 vCPUs busy, of its 2." in text
    raw["native_cpu"] = {"tx": {"guest_busy": 0.95, "vcpus": 2}}    # 237.5 us per frame: 2.14 vCPUs
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert "would keep 2.14 vCPUs busy, more than the 2 it has" in text
    del raw["native_cpu"]
    assert "Guest CPU per TCP TX frame" not in "\n".join(benchall.cdc_ecm_details(raw))


def test_cdc_ecm_details_give_tcps_rtt_under_load_per_run_and_the_medians():
    raw = {"kernel": {"tx": 300.0, "rx": 250.0, "tx_rtt_ms": 4.0},
           "kernel_more": [{"tx": 310.0, "rx": 240.0, "tx_rtt_ms": 6.0}],
           "kernel_after": {"tx": 290.0, "rx": 245.0, "tx_rtt_ms": 5.0},
           "native": {"tx": 250.0, "rx": 260.0, "tx_rtt_ms": 80.0},
           "native_more": [{"tx": 240.0, "rx": 255.0, "tx_rtt_ms": 70.5}, {"tx": 245.0, "rx": 250.0}]}
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert "| cdc_ether, round 2 | 310.0 | 240.0 | 6.0 ms | - |" in text
    assert "| C ring (udrv run), round 3 | 245.0 | 250.0 | - | - |" in text      # an older result: no RTT
    assert "cdc_ether 5.0 ms, udrv 75.2 ms" in text                          # medians of each side's runs
    raw["native-aqm=off"] = {"tx": 251.0, "rx": 259.0, "tx_rtt_ms": 90.0}
    raw["native-aqm=off_more"] = [{"tx": 249.0, "rx": 250.0, "tx_rtt_ms": 100.0}]
    raw["native-aqm=1/10"] = {"tx": 240.0, "rx": 258.0, "tx_rtt_ms": 9.0}
    raw["native-aqm=1/10_cpu"] = {}
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert "cdc_ether 5.0 ms, udrv 75.2 ms, udrv with UDRV_AQM=off 95.0 ms, udrv with UDRV_AQM=1/10 9.0 ms" in text
    assert "| C ring, UDRV_AQM=off, round 2 | 249.0 | 250.0 | 100.0 ms | - |" in text
    assert "| C ring, UDRV_AQM=1/10 | 240.0 | 258.0 | 9.0 ms | - |" in text
    assert [r.variant for r in benchall.cdc_ecm_rows(raw)][-2:] == ["C ring, UDRV_AQM=1/10"] * 2
    assert "a ping every 100 ms" not in text                               # no run had one
    for name, ms in (("kernel", 3.0), ("kernel_after", 3.4), ("native", 12.0), ("native-aqm=off", 30.0),
                     ("native-aqm=1/10", 6.0)):
        raw[name]["tx_ping_ms"] = ms
    text = "\n".join(benchall.cdc_ecm_details(raw))
    assert ("a ping every 100 ms beside the flow: cdc_ether 3.2 ms, udrv 12.0 ms, UDRV_AQM=off 30.0 ms, "
            "UDRV_AQM=1/10 6.0 ms") in text
    assert "| C ring (udrv run) | 250.0 | 260.0 | 80.0 ms | 12.0 ms |" in text
    # one side without any RTT: no latency line rather than half of one
    del raw["kernel"]["tx_rtt_ms"], raw["kernel_more"][0]["tx_rtt_ms"], raw["kernel_after"]["tx_rtt_ms"]
    assert "Latency under load" not in "\n".join(benchall.cdc_ecm_details(raw))


def test_pegasus_details_give_tcps_rtt_under_load(tmp_path, monkeypatch):
    runs = [{"path": "pegasus.ko", "direction": "host->peer (TX)", "mbit_s": 30.0, "gadget_cpu": 0.6,
             "udrv_cpu": None, "guest_busy": 0.7, "tcp_rtt_ms": 12.0},
            {"path": "udrv", "direction": "host->peer (TX)", "mbit_s": 37.0, "gadget_cpu": 0.7,
             "udrv_cpu": 0.6, "guest_busy": 0.9, "tcp_rtt_ms": 400.5},
            {"path": "udrv", "direction": "peer->host (RX)", "mbit_s": 50.0, "gadget_cpu": 0.7,
             "udrv_cpu": 0.6, "guest_busy": 0.9, "tcp_rtt_ms": None}]
    monkeypatch.setattr(benchall, "_run_tool", lambda *a, **k: ({"runs": runs}, "", 1.0))
    text = "\n".join(benchall.bench_pegasus(tmp_path, 1.0, 2).details)
    assert "| 1 | udrv | host->peer (TX) | 37.0 | 0.7 | 0.6 | 0.9 | 400.5 ms |" in text
    assert "| 1 | udrv | peer->host (RX) | 50.0 | 0.7 | 0.6 | 0.9 | - |" in text
    assert "pegasus.ko 12.0 ms, udrv 400.5 ms" in text


def test_e1000_report_gives_tcps_rtt_under_load_for_each_case():
    from udrv.bench.sidebyside import render_where_time_goes, tcp_sender_rtt_ms
    assert tcp_sender_rtt_ms({"end": {"streams": [{"sender": {"mean_rtt": 4186}}]}}) == 4.19
    assert tcp_sender_rtt_ms({"end": {"streams": [{"receiver": {}}]}}) is None     # -R: the peer sends
    cpu = {"busy_pct": 90.0, "user_pct": 10.0, "system_pct": 60.0, "softirq_pct": 20.0, "daemon_user_s": 1.0,
           "daemon_sys_s": 2.0, "frames": 1000, "guest_us_per_frame": 5.0, "iperf3_cpu_pct": 30.0, "wall_s": 5.0}
    cases = {"kernel": {"_label": "kernel e1000", "tcp_tx": {"cpu": {**cpu, "tcp_rtt_ms": 2.5}}},
             "native": {"_label": "C ring", "tcp_tx": {"cpu": {**cpu, "tcp_rtt_ms": 41.0, "daemon_us_per_frame": 3.0}}}}
    text = "\n".join(render_where_time_goes({"cases": cases, "config": {"seconds": 5}}))
    assert "latency under load (tcp_tx: the mean RTT the sending TCP measured in the run above): " \
           "kernel e1000 2.5 ms, C ring 41.0 ms." in text
    del cases["kernel"]["tcp_tx"]["cpu"]["tcp_rtt_ms"]
    assert "latency under load" not in "\n".join(render_where_time_goes({"cases": cases, "config": {"seconds": 5}}))
