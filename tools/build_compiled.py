"""Compile the detectors with mypyc into ``detectors/_compiled/``.

    python tools/build_compiled.py [--force] [--no-verify]

Needs mypy (the ``test`` extra has it) and a C compiler (Debian: ``apt-get
install gcc``); takes about a minute.  Does nothing when the build is up to
date with the sources.  On failure (no compiler, a mypyc error) it says so
and exits 1: the detectors then run as pure Python, as they do without a
build.  How the package chooses between the build and the sources, and why
the build lives in its own folder: :mod:`detectors.compiled`.

``pip install .`` runs it too (``setup.py``), with ``--no-verify``: the
package's dependencies are not in pip's build environment, so the build is
proven at import instead (``detectors.IMPLEMENTATION``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "detectors"

# mypy options of the compile (not the project's [tool.mypy]: that one checks
# every package).  The detectors import nothing typed beyond the standard
# library and their siblings (river, whose typing drags numpy/pandas/scipy in
# and took mypyc's check over ten minutes, is only the tests' reference now).
MYPY_INI = """\
[mypy]
ignore_missing_imports = True
cache_dir = {cache}
"""


def _spec() -> ModuleType:
    """detectors/compiled.py, loaded without importing the package."""
    spec = importlib.util.spec_from_file_location("_tokenward_compiled", PKG / "compiled.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fail(msg: str) -> int:
    usable, _ = _spec().check(PKG)
    then = ("the previous build, still up to date, stays in use" if usable is not None else
            "the detectors run as pure Python (that works, only slower)")
    print(f"build_compiled: {msg}\nbuild_compiled: {then}.", file=sys.stderr)
    return 1


def build(force: bool = False, verify: bool = True) -> int:
    c = _spec()
    if c.disabled():
        print("build_compiled: TOKENWARD_PURE_PYTHON is set; building anyway")
    build_dir = PKG / c.BUILD_DIR
    usable, _ = c.check(PKG)
    if usable is not None and not force:
        print(f"build_compiled: {build_dir.relative_to(ROOT)} is up to date")
        return 0
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return fail(f"no C compiler ({cc!r} not found; Debian: apt-get install gcc)")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        return fail(f"no Python headers ({headers} not found; Debian: apt-get install python3-dev)")
    try:
        import mypy.version
        from mypyc.build import mypycify
        from setuptools import setup
    except ImportError as e:
        return fail(f"mypyc is not installed ({e}); pip install mypy")
    t0 = time.monotonic()
    before = c.digests(ROOT)
    with tempfile.TemporaryDirectory(prefix="tokenward-mypyc-") as tmp:
        ini = Path(tmp, "mypy.ini")
        ini.write_text(MYPY_INI.format(cache=Path(tmp, "mypy_cache")))
        lib = Path(tmp, "lib")
        cwd = os.getcwd()
        os.chdir(tmp)  # mypyc and setuptools write their build files here
        try:
            exts = mypycify(["--config-file", str(ini),
                             *(str(PKG / f"{m}.py") for m in c.MODULES)],
                            group_name=c.GROUP, opt_level="3")
            setup(name="tokenward-detectors-compiled", ext_modules=exts,
                  script_args=["--quiet", "build_ext", "--build-lib", str(lib),
                               "--build-temp", str(Path(tmp, "temp"))])
        except (Exception, SystemExit) as e:
            return fail(f"the compile failed ({e!r}; see the messages above)")
        finally:
            os.chdir(cwd)
        if c.digests(ROOT) != before:
            return fail("the sources changed during the compile; run it again")
        new = PKG / (c.BUILD_DIR + ".new")
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for f in c.expected_files():
            shutil.copy2(lib / "detectors" / f, new / f)
        (new / c.MANIFEST).write_text(json.dumps(
            {**c.manifest(ROOT, mypy.version.__version__), "sources": before}, indent=1) + "\n")
    old = PKG / (c.BUILD_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if build_dir.exists():
        build_dir.rename(old)
    new.rename(build_dir)
    shutil.rmtree(old, ignore_errors=True)
    if not verify:
        print(f"build_compiled: compiled {len(c.MODULES)} modules into "
              f"{build_dir.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s (not loaded)")
        return 0
    # the proof: a fresh interpreter picks the build up
    r = subprocess.run([sys.executable, "-c", "import detectors; print(detectors.IMPLEMENTATION)"],
                       cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "TOKENWARD_PURE_PYTHON"})
    got = r.stdout.strip()
    if got != "compiled":
        return fail(f"the build does not load (got {got!r}): {r.stderr.strip()}")
    print(f"build_compiled: compiled {len(c.MODULES)} modules into "
          f"{build_dir.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--no-verify", action="store_true",
                    help="do not load the build in a fresh interpreter afterwards (an "
                         "environment without the package's dependencies: pip's build)")
    a = ap.parse_args()
    return build(a.force, verify=not a.no_verify)


if __name__ == "__main__":
    raise SystemExit(main())
