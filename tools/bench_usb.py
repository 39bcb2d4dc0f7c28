#!/usr/bin/env python3
"""`python3 tools/bench_usb.py ARGS` = `python3 -m udrv.bench.pegasus ARGS`: pegasus.ko vs udrv's pegasus, one guest boot.
udrv must be importable: `pip install -e .`, or PYTHONPATH=the checkout."""
import runpy

runpy.run_module("udrv.bench.pegasus", run_name="__main__", alter_sys=True)
