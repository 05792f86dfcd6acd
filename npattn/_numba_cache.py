"""Where Numba's on-disk cache of npattn's kernels lives, and the one-time compile notice.

npattn writes nothing inside its installed package. Numba's default for ``cache=True`` is
a ``__pycache__`` folder beside the source file, which after ``pip install .`` is inside
``site-packages/npattn``: ``pip uninstall`` then leaves those files behind (and a
leftover ``site-packages/npattn`` folder shadows a later editable install), and a
read-only site-packages cannot cache at all. So npattn's kernels are cached here:

1. ``$NPATTN_CACHE_DIR``, when set;
2. else ``$NUMBA_CACHE_DIR``, when set (Numba's own setting, honoured as Numba does);
3. else the platform's per-user cache folder: ``$XDG_CACHE_HOME/npattn`` or
   ``~/.cache/npattn`` on Linux, ``~/Library/Caches/npattn`` on macOS,
   ``%LOCALAPPDATA%\\npattn\\Cache`` on Windows;
4. else, when that folder cannot be written, ``<tempdir>/npattn-cache-<user>``.

Inside it, each source folder gets its own sub-folder (its name plus a hash of its full
path, Numba's own rule), so two checkouts or two installed versions never share entries;
Numba keys each entry on the source file's contents as well.

Mechanism: Numba looks for a cache folder by asking a list of *locator* classes in turn
(``numba.core.caching.CacheImpl._locator_classes``); the first that accepts a function
decides. ``install()`` puts one locator in front of that list, and it accepts only
functions whose source file lies inside the ``npattn`` package folder; for every other
function it declines, and Numba's own locators decide as before. So Numba's cache of
other packages in the same process is unchanged (an environment variable such as
``NUMBA_CACHE_DIR`` would have moved theirs too). A user who sets
``NUMBA_CACHE_LOCATOR_CLASSES`` replaces Numba's whole list, this locator included.

The notice: the first Numba compilation of an npattn kernel in a process (a cache miss:
Numba broadcasts its ``numba:compile`` event only when it compiles, not when it loads
from the cache) prints one line to stderr, once per process.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# the first deform_conv2d forward + backward on a 2-core machine: 51 s measured while it was
# loaded; `npattn verify` has compiled in about 25 s on an idle one
COMPILE_SECONDS = "30 s to a minute"

_installed = False
_announced = False


def user_cache_dir() -> pathlib.Path:
    """The platform's per-user cache folder for npattn (not created here)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(pathlib.Path.home() / "AppData" / "Local")
        return pathlib.Path(base) / "npattn" / "Cache"
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / "npattn"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "npattn"


def cache_dir() -> pathlib.Path:
    """The folder npattn's Numba kernels are cached in now (see the module docstring)."""
    for var in ("NPATTN_CACHE_DIR", "NUMBA_CACHE_DIR"):
        value = os.environ.get(var)
        if value:
            return pathlib.Path(value).expanduser()
    return user_cache_dir()


def _fallback_dir() -> pathlib.Path:
    try:
        user = os.getlogin()
    except OSError:
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return pathlib.Path(tempfile.gettempdir()) / f"npattn-cache-{user}"


def is_npattn_file(py_file) -> bool:
    """True for a source file inside the npattn package folder."""
    try:
        return pathlib.Path(py_file).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _locator_class():
    from numba.core import caching

    base = getattr(caching, "_CacheLocator", None) or caching.CacheLocator
    mixin = getattr(caching, "_SourceFileBackedLocatorMixin", None) or caching.SourceFileBackedLocatorMixin

    class NpattnCacheLocator(mixin, base):
        """Numba cache locator for npattn's own source files only (see the module docstring)."""

        def __init__(self, py_func, py_file, root):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(pathlib.Path(root) / self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            if not is_npattn_file(py_file):
                return None  # not ours: Numba's own locators decide
            for root in (cache_dir(), _fallback_dir()):
                self = cls(py_func, py_file, root)
                try:
                    self.ensure_cache_path()
                except OSError:
                    continue
                return self
            return None

    return NpattnCacheLocator


def _announce(event):
    global _announced
    if _announced or not event.is_start:
        return
    dispatcher = (event.data or {}).get("dispatcher")
    py_func = getattr(dispatcher, "py_func", None)
    if py_func is None or not is_npattn_file(getattr(py_func.__code__, "co_filename", "")):
        return
    _announced = True
    print(
        f"npattn: compiling the Numba sampling kernels once ({COMPILE_SECONDS}); "
        f"later runs load them from {cache_dir()}",
        file=sys.stderr,
        flush=True,
    )


def install() -> None:
    """Put npattn's locator first in Numba's list and listen for npattn's compilations
    (idempotent; called by the kernel module before it defines its kernels)."""
    global _installed
    if _installed:
        return
    from numba.core import caching, event

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    impl._locator_classes.insert(0, _locator_class())

    class _CompileNotice(event.Listener):
        def on_start(self, ev):
            _announce(ev)

        def on_end(self, ev):
            pass

    event.register("numba:compile", _CompileNotice())
    _installed = True
