"""Detectors: pure, I/O-free anomaly detection over usage events.

The pipeline builds one :class:`Engine` per partition and calls
:meth:`Engine.observe` per event and :meth:`Engine.advance` after each batch.

:data:`IMPLEMENTATION` says which build runs: ``"compiled"`` (mypyc, built
by ``python tools/build_compiled.py``) or ``"interpreted"`` (the sources,
always the reference); see :mod:`detectors.compiled` for when the compiled
build is used.
"""

import importlib
import sys
from pathlib import Path

from . import compiled as _compiled

IMPLEMENTATION = "interpreted"


def _load_compiled() -> None:
    global IMPLEMENTATION
    if _compiled.disabled():
        return
    build, why = _compiled.check(Path(__file__).resolve().parent)
    if build is None:
        if why is not None:
            print(f"tokenward: not using the compiled detectors: {why}; running the "
                  "pure-Python ones (rebuild: python tools/build_compiled.py)", file=sys.stderr)
        return
    # the build folder goes first on the package's path: detectors.engine etc.
    # (and the group's shared library) now resolve to the compiled modules
    __path__.insert(0, str(build))
    names = [f"{__name__}.{m}" for m in _compiled.MODULES]
    try:
        for name in names:
            mod = importlib.import_module(name)
            if not str(getattr(mod, "__file__", "")).startswith(str(build)):
                raise ImportError(f"{name} was not loaded from {build}")
    except Exception as e:  # any failure: the whole group runs from the sources
        __path__.remove(str(build))
        for name in [*names, _compiled.GROUP + "__mypyc"]:
            sys.modules.pop(name, None)
        print(f"tokenward: the compiled detectors failed to load ({e!r}); running the "
              "pure-Python ones", file=sys.stderr)
        return
    IMPLEMENTATION = "compiled"


_load_compiled()

from .config import DetectorConfig, Settings  # noqa: E402
from .engine import Engine  # noqa: E402
from .finding import KINDS, Finding  # noqa: E402

__all__ = ["IMPLEMENTATION", "KINDS", "DetectorConfig", "Engine", "Finding", "Settings"]
