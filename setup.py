"""Build hook: ``pip install .`` compiles the detectors with mypyc.

The package metadata lives in ``pyproject.toml``; this file only adds a step
to ``build_py``: ``tools/build_compiled.py --no-verify`` (in its own process,
with the mypy of ``[build-system] requires``) writes ``detectors/_compiled/``,
which the wheel carries as package data.  The compiled detectors cost about
half as much per event as the sources (docs/detectors.md).  A failed compile
(no C compiler, no Python headers) is reported and the install goes on: the
package then runs as pure Python, as it always can.  Editable installs skip
the step (run ``python tools/build_compiled.py`` in the tree, as
``scripts/test.sh`` does); ``TOKENWARD_PURE_PYTHON=1`` skips it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPy(build_py):
    def run(self) -> None:
        skip = (getattr(self, "editable_mode", False)
                or os.environ.get("TOKENWARD_PURE_PYTHON", "") not in ("", "0")
                or not (ROOT / "tools" / "build_compiled.py").is_file())
        if not skip:
            r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_compiled.py"),
                                "--no-verify"], cwd=ROOT, check=False)
            if r.returncode:
                print("tokenward: installing without compiled detectors (pure Python)",
                      file=sys.stderr)
        super().run()


setup(cmdclass={"build_py": BuildPy})
