#!/usr/bin/env python3
"""`python3 tools/guest.py ARGS` = `python3 -m udrv.testbed.guest ARGS`: the kernel-tier QEMU harness.
udrv must be importable: `pip install -e .`, or PYTHONPATH=the checkout."""
import runpy

runpy.run_module("udrv.testbed.guest", run_name="__main__", alter_sys=True)
