"""npattn writes nothing inside its installed package: Numba's cache of its kernels goes to
a per-user folder (``npattn._numba_cache``), other packages' Numba caches are untouched,
the first compile says so on stderr, and ``pip uninstall`` leaves nothing behind.

Each test runs Python in a subprocess with its own cache folder, so that it sees a cold
or a warm cache as it intends."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import npattn
from npattn import _numba_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(npattn.__file__).resolve().parent

KERNEL = textwrap.dedent("""
    import numpy as np, npattn
    r = np.random.default_rng(0)
    x, off, w = r.random((1, 2, 5, 4)), 0.3 * r.random((1, 18, 5, 4)), r.random((3, 2, 3, 3))
    y = npattn.deform_conv2d(x, off, w, padding=1, backend="numba")
    print("ran", y.shape)
""")


def run_python(code, env_extra, cwd, drop=("NPATTN_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    env.setdefault("NUMBA_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def cache_files(folder):
    return sorted(p for p in pathlib.Path(folder).rglob("*") if p.suffix in (".nbi", ".nbc"))


def package_cache_files():
    return [p for p in PACKAGE.rglob("*") if p.suffix in (".nbi", ".nbc")]


# ------------------------------------------------------------------ where the cache goes

def test_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("NPATTN_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    if sys.platform.startswith("linux"):
        assert _numba_cache.cache_dir() == pathlib.Path.home() / ".cache" / "npattn"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert _numba_cache.cache_dir() == tmp_path / "xdg" / "npattn"
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
        assert _numba_cache.cache_dir() == pathlib.Path.home() / ".cache" / "npattn"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert _numba_cache.cache_dir() == tmp_path / "numba"
    monkeypatch.setenv("NPATTN_CACHE_DIR", str(tmp_path / "mine"))
    assert _numba_cache.cache_dir() == tmp_path / "mine"


def test_is_npattn_file():
    assert _numba_cache.is_npattn_file(PACKAGE / "sampling" / "cpu.py")
    assert not _numba_cache.is_npattn_file(ROOT / "tests" / "test_numba_cache.py")
    assert not _numba_cache.is_npattn_file(pathlib.Path(sysconfig.get_paths()["purelib"]) / "numba" / "__init__.py")


@pytest.mark.slow
def test_cold_then_warm_cache_in_the_users_folder_never_in_the_package(tmp_path):
    before = package_cache_files()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    cold = run_python(KERNEL, env, tmp_path)
    assert cold.returncode == 0, cold.stderr
    notice = [line for line in cold.stderr.splitlines() if line.startswith("npattn: compiling")]
    assert notice == [
        f"npattn: compiling the Numba sampling kernels once ({_numba_cache.COMPILE_SECONDS}); "
        f"later runs load them from {tmp_path / 'xdg' / 'npattn'}"
    ]
    assert cache_files(tmp_path / "xdg" / "npattn"), "no cache files in the user's cache folder"
    assert package_cache_files() == before, "cache files written inside the npattn package"
    warm = run_python(KERNEL, env, tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert "npattn: compiling" not in warm.stderr  # loaded from the cache: no notice


# where Numba will cache a kernel, asked without compiling it
WHERE = "from npattn.sampling import cpu; print(cpu._im2col_kernel._cache._cache_path)"


def test_npattn_cache_dir_and_numba_cache_dir_are_honoured(tmp_path):
    for env, root in (({"NPATTN_CACHE_DIR": str(tmp_path / "a"), "NUMBA_CACHE_DIR": str(tmp_path / "b")}, tmp_path / "a"),
                      ({"NUMBA_CACHE_DIR": str(tmp_path / "b")}, tmp_path / "b"),
                      ({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "npattn")):
        r = run_python(WHERE, env, tmp_path)
        assert r.returncode == 0, r.stderr
        path = pathlib.Path(r.stdout.strip())
        assert path.parent == root and path.name.startswith("sampling_"), (env, path)


def test_other_packages_keep_numbas_own_cache_location(tmp_path):
    """With npattn's locator installed, a cached function of another module still goes
    where Numba puts it (its own __pycache__ here), not into npattn's folder."""
    pkg = tmp_path / "otherpkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    code = WHERE + "\nimport sys; sys.path.insert(0, %r)\nimport mod\nprint(mod.twice(21))\n" % str(pkg)
    r = run_python(code, {"NPATTN_CACHE_DIR": str(tmp_path / "npattn-cache")}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "42"
    assert cache_files(pkg / "__pycache__"), "the other module's cache is not beside it"
    assert not [p for p in cache_files(tmp_path / "npattn-cache") if "mod." in p.name]


@pytest.mark.slow
def test_install_run_uninstall_leaves_nothing_in_site_packages(tmp_path):
    """pip install npattn into a fresh venv, run a kernel, pip uninstall: no npattn folder
    is left. The venv gets npattn's wheel without dependencies; numpy, numba and scipy
    come from this interpreter's site-packages through PYTHONPATH (no download)."""
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("npattn-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    site = pathlib.Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "npattn" / "sampling" / "cpu.py").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("NPATTN_CACHE_DIR", "NUMBA_CACHE_DIR")}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], XDG_CACHE_HOME=str(tmp_path / "xdg"), NUMBA_NUM_THREADS="1")
    code = KERNEL + "print(npattn.__file__)\n"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert str(site / "npattn") in r.stdout  # the venv's copy ran
    assert cache_files(tmp_path / "xdg" / "npattn")
    assert not [p for p in (site / "npattn").rglob("*") if p.suffix in (".nbi", ".nbc")]
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "npattn"], check=True, timeout=300)
    assert not (site / "npattn").exists(), sorted(str(p) for p in (site / "npattn").rglob("*"))[:10]
