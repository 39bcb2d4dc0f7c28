"""udrv's benchmarks (`udrv bench ...`; commands, not tests): each measures udrv against a baseline
in the same run. all = the side-by-side report of every device, sidebyside = e1000 in a QEMU
guest, cdc_ecm and pegasus = the USB devices in theirs, framing = C vs Python framing, ring =
the e1000 rings and TAP forwarding, recovery = recovery latency and guard overhead, aqm = latency
under load; probe and echo are the 1 ms UDP instrument. They run udrv through its public API
(udrv.registry, udrv.service) and the test bed (udrv.testbed), never through the cli."""
