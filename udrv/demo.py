"""`udrv demo`: the embedded pegasus under iperf3, with faults injected in the middle.

Runs beside the daemon's loop (in a thread, talking to it through the control socket like
`udrv inject` would) and prints what a user wants to see: throughput before/after, every
recovery with what was rolled back, restored and re-issued, and the longest silence a 1 ms
UDP probe saw.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from .control import request
from .bench.probe import GapProbe

DEFAULT_FAULTS = ["xmit:raise", "poll:stall", "set_rx_mode:raise", "worker:segv"]


class DemoScenario:
    def __init__(self, duration: float = 10.0, faults: list[str] | None = None, ifname: str = "udrv0"):
        self.duration = duration
        self.faults = faults or DEFAULT_FAULTS
        self.ifname = ifname
        self.exit_code = 1
        self.report: dict[str, Any] = {}

    def start(self, daemon: Any, peer: Any) -> None:
        self.daemon, self.peer = daemon, peer
        threading.Thread(target=self._run, name="udrv-demo", daemon=True).start()

    def _say(self, msg: str) -> None:
        print(f"demo: {msg}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        procs: list[subprocess.Popen] = []
        try:
            self.exit_code = self._scenario(procs)
        except Exception as e:           # the demo must end and say why
            self._say(f"failed: {e}")
            self.exit_code = 1
        finally:
            for p in procs:
                p.terminate()
            self.daemon.stop()

    def _scenario(self, procs: list[subprocess.Popen]) -> int:
        peer = self.peer
        procs.append(subprocess.Popen(peer.netns_exec(sys.executable, "-m", "udrv.bench.echo")))
        have_iperf = shutil.which("iperf3") is not None
        if have_iperf:
            procs.append(subprocess.Popen(peer.netns_exec("iperf3", "-s", "-1"), stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        probe = GapProbe(peer.cfg.peer_addr).start()
        time.sleep(0.5)
        got = probe.received_so_far()
        self._say(f"ping-equivalent: {got} UDP echoes answered by {peer.cfg.peer_addr} across {self.ifname} "
                  "in the first 0.5 s")
        client = None
        if have_iperf:
            client = subprocess.Popen(["iperf3", "-c", peer.cfg.peer_addr, "-t", str(self.duration), "-J"],
                                      stdout=subprocess.PIPE, text=True)
        else:
            self._say("iperf3 is not installed (apt-get install iperf3): only the UDP probe runs")
        time.sleep(self.duration / 2)
        for f in self.faults:
            entry, kind = f.split(":")
            r = request(self.ifname, {"cmd": "inject", "entry": entry, "kind": kind, "count": 1})
            self._say(f"injected {kind} into {entry}: {'armed' if r.get('ok') else r.get('error')}")
            if entry == "set_rx_mode":       # make the host change its RX mode so the entry runs
                subprocess.run(["ip", "link", "set", self.ifname, "promisc", "on"], check=False)
            time.sleep(0.3)
        if client is not None:
            out, _ = client.communicate(timeout=self.duration + 30)
        else:
            time.sleep(self.duration / 2)
            out = ""
        res = probe.stop()
        subprocess.run(["ip", "link", "set", self.ifname, "promisc", "off"], check=False)
        time.sleep(0.3)
        st = request(self.ifname, {"cmd": "status"})["status"]
        self._say(f"status: rx {st['rx_packets']} tx {st['tx_packets']} packets; recoveries {st['recoveries']}, "
                  f"escalations {st['escalations']}, TX journal {st['tx_journal']}")
        for rec in st["recent_recoveries"]:
            silent = "no traffic" if rec["silent_ms"] is None else f"{rec['silent_ms']:.2f} ms"
            device = ("device as checkpointed, not restored" if rec.get("device_untouched")
                      else f"device restored {rec['device_restored']}")
            self._say(f"  recovered {rec['entry']} from {rec['fault']} ({rec['detail']}): {rec['outcome']}; "
                      f"rolled back {rec['rolled_back'] or '-'}; {device}; "
                      f"re-issued {rec['reissued']} frames; recovery {rec['recovery_ms']:.2f} ms; silent {silent}")
        for f in st.get("recent_failovers", []):
            silent = "no traffic" if f["silent_ms"] is None else f"{f['silent_ms']:.2f} ms"
            self._say(f"  worker {f['pid']} {f['cause']}, detected by {f['detected_by']} in {f['detection_ms']:.2f} ms; "
                      f"worker {f['successor']} took over ({f['how']}) in {f['failover_ms'] or 0:.2f} ms, "
                      f"re-issued {f['reissued']} frames; silent {silent}")
        self._say(f"probe: {res.received}/{res.sent} answered, longest gap {res.max_gap_ms:.1f} ms")
        ok = res.received > 0 and st["recoveries"] >= 1
        if out:
            j = json.loads(out)
            if "error" in j:
                self._say(f"iperf3: {j['error']}")
                ok = False
            else:
                bps = j["end"]["sum_received"]["bits_per_second"]
                per_s = [iv["sum"]["bits_per_second"] / 1e6 for iv in j["intervals"]]
                self._say(f"iperf3: {bps / 1e6:.1f} Mbit/s received over {self.duration:.0f} s; per second: "
                          + " ".join(f"{x:.0f}" for x in per_s))
                ok = ok and bps > 0 and min(per_s) > 0
        self.report = {"status": st, "probe": res}
        self._say("PASS: traffic kept flowing through every injected fault" if ok
                  else "FAIL: see above")
        return 0 if ok else 1
