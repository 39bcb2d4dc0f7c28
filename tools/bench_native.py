#!/usr/bin/env python3
"""`python3 tools/bench_native.py ARGS` = `python3 -m udrv.bench.framing ARGS`: C framing vs Python framing.
udrv must be importable: `pip install -e .`, or PYTHONPATH=the checkout."""
import runpy

runpy.run_module("udrv.bench.framing", run_name="__main__", alter_sys=True)
