"""Build hook for udrv's two optional C modules (see native/build.py): the runtime's fast path
`udrv._native` and the benches' and test bed's `udrv._rigs`.

The package metadata lives in pyproject.toml. This file exists for two reasons: cffi's
out-of-line API mode joins setuptools through the `cffi_modules` keyword, and both extensions
are optional — without a C compiler or without the libusb headers `pip install` still succeeds
(with a warning per module) and udrv runs its pure-Python datapath; `udrv.fastpath.why_unavailable()`
and `udrv.testbed.rigs.why_unavailable()` say what was missing.

UDRV_NO_NATIVE=1 skips the C build on purpose (to test the fallback).
"""
from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
# Notes for why_unavailable() (udrv.fastpath, udrv.testbed.rigs), per module: in the source tree for
# editable installs (the directory is gitignored), inside the built package for regular ones.
NOTES = {"udrv._native": ("build-error.txt", "_native_build_error.txt"),
         "udrv._rigs": ("rigs-build-error.txt", "_rigs_build_error.txt")}
WHAT = {"udrv._native": ("udrv's C fast path (udrv._native)",
                         "udrv works without it, on the pure-Python datapath (a few % of kernel throughput in a VM)"),
        "udrv._rigs": ("udrv's bench and test-bed C (udrv._rigs)",
                       "udrv runs without it; `udrv bench ring|tap` and the C gadget pump need it")}


def _tree_note(module: str) -> str:
    return os.path.join(HERE, "native", "_build", NOTES[module][0])


def _warn(module: str, reason: str, todo: str, note: str) -> None:
    what, without = WHAT[module]
    text = (f"{what} was not built: {reason}.\n{without}.\n"
            f"To get it: {todo}, then run `pip install -e .` (or `pip install .`) again.")
    bar = "=" * 78
    sys.stderr.write(f"\n{bar}\nWARNING: {text}\n{bar}\n\n")
    try:
        os.makedirs(os.path.dirname(note), exist_ok=True)
        with open(note, "w") as f:
            f.write(text + "\n")
    except OSError:
        pass


class OptionalBuildExt(build_ext):
    """build_ext whose failure is a warning: the C modules are accelerators and instruments, not
    requirements."""

    def _note(self, module: str) -> str:
        """Editable installs: the source tree; regular ones: inside the built package (installed)."""
        return _tree_note(module) if self.inplace else os.path.join(self.build_lib, "udrv", NOTES[module][1])

    def _warn(self, module: str, reason: str, todo: str) -> None:
        _warn(module, reason, todo, self._note(module))

    def run(self) -> None:
        if os.environ.get("UDRV_NO_NATIVE") == "1":
            for ext in self.extensions:
                self._warn(ext.name, "UDRV_NO_NATIVE=1 is set", "unset UDRV_NO_NATIVE")
            self.extensions = []
            return
        try:
            super().run()
        except Exception as e:  # the compiler may fail in ways setuptools does not classify
            for ext in self.extensions:
                self._warn(ext.name, f"the build failed ({e})", "read the compiler output above (pip install -v)")

    def build_extension(self, ext) -> None:
        cc = (getattr(self.compiler, "compiler_so", None) or ["cc"])[0]
        if not shutil.which(cc):
            self._warn(ext.name, f"no C compiler ({cc!r} not found)", "install one (Debian: apt-get install gcc)")
            return
        header_dirs = list(ext.include_dirs) + ["/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0"]
        if not any(os.path.exists(os.path.join(d, "libusb.h")) for d in header_dirs):
            self._warn(ext.name, "the libusb-1.0 headers (libusb.h) are missing",
                       "install them (Debian: apt-get install libusb-1.0-0-dev)")
            return
        try:
            super().build_extension(ext)
        except Exception as e:
            self._warn(ext.name, f"compiling or linking failed ({e})", "read the compiler output above (pip install -v)")
            return
        try:
            os.unlink(self._note(ext.name))
        except OSError:
            pass

    def copy_extensions_to_source(self) -> None:
        # editable installs copy the built module into udrv/; skip a module that was not built
        inplace, self.inplace = self.inplace, False      # where build_extension put it
        try:
            built = [e for e in self.extensions if os.path.exists(self.get_ext_fullpath(e.name))]
        finally:
            self.inplace = inplace
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything
        for ext in built:
            _remove_stale_builds(self.get_ext_fullpath(ext.name))


def _remove_stale_builds(keep: str) -> None:
    """A module built under another name (python3 native/build.py makes a cpython-3xx .so, pip an
    abi3 one) would shadow the fresh one: the interpreter prefers the more specific suffix."""
    stem = os.path.basename(keep).split(".")[0]
    folder = os.path.dirname(os.path.abspath(keep))
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(stem + ".") and name.endswith(".so") and path != os.path.abspath(keep):
            os.unlink(path)

setup(
    cffi_modules=["native/build.py:ffibuilder", "native/build.py:rigs_ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
