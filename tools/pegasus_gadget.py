#!/usr/bin/env python3
"""`python3 tools/pegasus_gadget.py ARGS` = `python3 -m udrv.testbed.pegasus_gadget ARGS`: the pegasus model as a real USB device.
udrv must be importable: `pip install -e .`, or PYTHONPATH=the checkout."""
import runpy

runpy.run_module("udrv.testbed.pegasus_gadget", run_name="__main__", alter_sys=True)
