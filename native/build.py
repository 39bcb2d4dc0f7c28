"""Build udrv's C with cffi (out-of-line API mode): two extension modules.

  udrv._native   the runtime's C fast path (native/*.c): framing, the TX journal, the USB and
                 e1000 rings, TAP reads, GSO/GRO. udrv runs without it, on its Python datapath
                 (udrv.fastpath says why it is missing).
  udrv._rigs     the benches' and the test bed's C (native/rigs/*.c): the TAP forwarding loops
                 and e1000 device stub of `udrv bench ring|tap` (tapfwd.c), the usbfs floor of
                 the cdc_ecm bench (usbfloor.c), the 1 ms recovery probe and echo loops
                 (probe.c), the pegasus gadget's data path (pegpump.c). The runtime never
                 imports it (udrv.testbed.rigs loads it). It includes udrv._native's types
                 (ffi.include: a `struct udrv_journal *` of one module is one of the other) and
                 compiles the runtime's journal.c in, since tapfwd.c fills a journal; so it loads
                 only next to a udrv._native of the same tree.

Conventions (so a new C file joins without touching this script), per module folder:
  * every `*.c` of the folder is compiled into its module;
  * every `*.cdef` holds the cffi declarations Python may call; they are read in name order,
    and for `NAME.cdef` the module includes `NAME.h` if it exists;
  * everything links against libusb-1.0 (the same shared library python-libusb1 loads).
Constants in a .cdef are best written `#define NAME ...` so the value comes from the header.

Used by setup.py (`cffi_modules=["native/build.py:ffibuilder", "native/build.py:rigs_ffibuilder"]`,
run by `pip install -e .` / `pip install .`; cffi writes its generated C into the setuptools
build directory), or by hand:

    python3 native/build.py        # builds both into native/_build/, copies the .so files into udrv/
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from cffi import FFI

MODULE = "udrv._native"
RIGS_MODULE = "udrv._rigs"
HERE = os.path.dirname(os.path.abspath(__file__))
RIGS = os.path.join(HERE, "rigs")
ROOT = os.path.dirname(HERE)
BUILD_DIR = os.path.join(HERE, "_build")
_ABSOLUTE = False   # cffi's own compile() changes directory: it needs absolute paths
LIBUSB_HEADER = "libusb.h"
COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"]


def _rel(path: str) -> str:
    """Paths relative to the working directory when possible (setuptools prefers them)."""
    if _ABSOLUTE:
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def c_sources(folder: str = HERE) -> list[str]:
    return [_rel(p) for p in sorted(glob.glob(os.path.join(folder, "*.c")))]


def rigs_sources() -> list[str]:
    """native/rigs/*.c, and the runtime's journal.c that tapfwd.c appends to (udrv._native's
    symbols are not visible to another extension module)."""
    return c_sources(RIGS) + [_rel(os.path.join(HERE, "journal.c"))]


def cdef_files(folder: str = HERE) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.cdef")))


def headers_for_cdefs(folder: str = HERE) -> list[str]:
    out = []
    for cdef in cdef_files(folder):
        header = cdef[:-len(".cdef")] + ".h"
        if os.path.exists(header):
            out.append(os.path.basename(header))
    return out


def libusb_flags() -> tuple[list[str], list[str], list[str]]:
    """(include dirs, library dirs, libraries) for libusb-1.0: pkg-config, else Debian's paths."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags-only-I", "libusb-1.0"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.split()
        libs = subprocess.run(["pkg-config", "--libs", "libusb-1.0"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.split()
        incs = [f[2:] for f in cflags if f.startswith("-I")]
        libdirs = [f[2:] for f in libs if f.startswith("-L")]
        names = [f[2:] for f in libs if f.startswith("-l")] or ["usb-1.0"]
        return incs, libdirs, names
    except (OSError, subprocess.SubprocessError):
        return ["/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0"], [], ["usb-1.0"]


def find_libusb_header(include_dirs: list[str]) -> str | None:
    for d in include_dirs + ["/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0"]:
        p = os.path.join(d, LIBUSB_HEADER)
        if os.path.exists(p):
            return p
    return None


def _module(ffi: FFI, name: str, folder: str, sources: list[str], headers: list[str]) -> FFI:
    """ffi with folder's cdefs, set up to build `name` from sources; its C includes headers."""
    for path in cdef_files(folder):
        with open(path) as f:
            ffi.cdef(f.read())
    include_dirs, library_dirs, libraries = libusb_flags()
    source = "".join(f'#include "{h}"\n' for h in headers)
    ffi.set_source(
        name, source,
        sources=sources,
        include_dirs=list(dict.fromkeys([_rel(folder), _rel(HERE)])) + include_dirs,
        library_dirs=library_dirs,
        libraries=libraries + ["m"],   # sqrt: CoDel's control law (journal.c)
        depends=[_rel(p) for p in sorted(set(glob.glob(os.path.join(folder, "*.h")) + glob.glob(os.path.join(HERE, "*.h"))))],
        extra_compile_args=COMPILE_ARGS,
    )
    return ffi


def make_ffibuilder() -> FFI:
    return _module(FFI(), MODULE, HERE, c_sources(), headers_for_cdefs())


def make_rigs_ffibuilder(native: FFI) -> FFI:
    ffi = FFI()
    ffi.include(native)     # the journal's struct (and every other runtime type) shared, not redeclared
    # cffi checks the layout of every included type too: the runtime's headers come first
    return _module(ffi, RIGS_MODULE, RIGS, rigs_sources(), headers_for_cdefs() + headers_for_cdefs(RIGS))


ffibuilder = make_ffibuilder()
rigs_ffibuilder = make_rigs_ffibuilder(ffibuilder)


def _install(built: str, module: str) -> str:
    """Copy a built .so into udrv/, removing the module's builds under other names first (pip
    makes an abi3 .so, this script a cpython-3xx one: one would shadow the other)."""
    stem = module.rsplit(".", 1)[1]
    for old in glob.glob(os.path.join(ROOT, "udrv", f"{stem}.*.so")):
        os.unlink(old)
    dest = os.path.join(ROOT, "udrv", os.path.basename(built))
    shutil.copy2(built, dest)
    return dest


def main() -> int:
    """Developer build without pip: compile both modules in native/_build, drop the .so files into udrv/."""
    global _ABSOLUTE
    _ABSOLUTE = True
    native = make_ffibuilder()
    for module, ffi in ((MODULE, native), (RIGS_MODULE, make_rigs_ffibuilder(native))):
        tmp = os.path.join(BUILD_DIR, module.rsplit(".", 1)[1].lstrip("_"))
        os.makedirs(tmp, exist_ok=True)
        print(f"built {_install(ffi.compile(tmpdir=tmp, verbose=True), module)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
