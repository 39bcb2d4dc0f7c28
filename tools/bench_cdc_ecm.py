#!/usr/bin/env python3
"""`python3 tools/bench_cdc_ecm.py ARGS` = `python3 -m udrv.bench.cdc_ecm ARGS`: udrv's cdc_ecm vs cdc_ether, one guest boot.
udrv must be importable: `pip install -e .`, or PYTHONPATH=the checkout."""
import runpy

runpy.run_module("udrv.bench.cdc_ecm", run_name="__main__", alter_sys=True)
