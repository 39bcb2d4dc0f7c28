"""The benches' and the test bed's C (`udrv._rigs`, built from native/rigs/ beside the runtime's
`udrv._native`; native/build.py says what is in it), seen from Python.

    from udrv.testbed import rigs
    ffi, lib = rigs.require()      # or rigs.available() / rigs.why_unavailable()

The runtime never loads it: a machine that runs `udrv run` needs only udrv._native.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UdrvError

try:
    from .. import _rigs  # type: ignore[attr-defined]
    ffi: Any = _rigs.ffi
    lib: Any = _rigs.lib
    _IMPORT_ERROR = ""
except ImportError as _e:          # not built; or udrv._native, whose types it includes, does not load
    ffi = lib = None
    _IMPORT_ERROR = str(_e) or type(_e).__name__

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # udrv/


class RigsUnavailable(UdrvError):
    """The bench and test-bed C cannot be used here; the message says why and what to do."""


def _install_note() -> str | None:
    """What setup.py noted when it could not build udrv._rigs: inside the package after a regular
    install, in the source tree's native/_build after an editable one."""
    for path in (os.path.join(_PACKAGE_DIR, "_rigs_build_error.txt"),
                 os.path.join(os.path.dirname(_PACKAGE_DIR), "native", "_build", "rigs-build-error.txt")):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None


def why_unavailable() -> str:
    """Empty when udrv._rigs loads, otherwise why not and what to do about it."""
    if lib is not None:
        return ""
    from .. import fastpath
    if not fastpath.available():
        return f"udrv._rigs needs udrv._native, which does not load: {fastpath.why_unavailable()}"
    note = _install_note() if "_rigs" in _IMPORT_ERROR else None
    if note:
        return f"udrv._rigs is not built. At install time: {note}"
    return (f"udrv._rigs (the bench and test-bed C) does not load ({_IMPORT_ERROR}): run `python3 native/build.py` "
            "or `pip install -e .` to build it")


def available() -> bool:
    return lib is not None


def require() -> tuple[Any, Any]:
    """(ffi, lib) of udrv._rigs, or RigsUnavailable saying why not."""
    if lib is None:
        raise RigsUnavailable(why_unavailable())
    return ffi, lib
