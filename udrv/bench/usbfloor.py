"""The usbfs floor (native/rigs/usbfloor.c): what submit + reap through usbfs alone cost per frame
on a USB device, the lower bound the cdc_ecm bench holds udrv's USB ring against."""
from __future__ import annotations

from ..errors import UdrvError
from ..testbed import rigs


def usb_floor(vid: int, pid: int, control: int, interface: int, alt: int, ep_out: int, frame: bytes,
              n_inflight: int = 64, seconds: float = 3.0) -> dict[str, float]:
    """Bulk OUT transfers of `frame`, n_inflight queued and resubmitted from their completions, on
    this thread, for `seconds`; `control` (or -1) is claimed too. The device must not be in use by
    another process."""
    ffi, lib = rigs.require()
    r = ffi.new("struct udrv_usb_floor *")
    if lib.udrv_usb_floor_run(vid, pid, control, interface, alt, ep_out, ffi.from_buffer(frame), len(frame),
                              n_inflight, seconds, r) < 0:
        raise UdrvError(f"usbfs floor on {vid:04x}:{pid:04x}: {ffi.string(r.what).decode()}")

    def per_s(x: float) -> float:
        return round(x / r.seconds, 1) if r.seconds else 0.0
    us_each = 1e6 / max(1, r.frames)
    return {"frames": int(r.frames), "errors": int(r.errors), "seconds": round(r.seconds, 3),
            "frames_per_s": per_s(r.frames), "mbit_s": per_s(r.frames * len(frame) * 8 / 1e6),
            "us_per_frame_user": round(r.cpu_user * us_each, 2), "us_per_frame_sys": round(r.cpu_sys * us_each, 2)}
