"""The optional compiled (mypyc) build of the detectors, and when to use it.

``python tools/build_compiled.py`` compiles :data:`MODULES` with mypyc into
``detectors/_compiled/`` (one shared library and a small extension module per
compiled module) and records, in ``_compiled/BUILD.json``, the SHA-256 of
every source it was built from (:data:`SOURCES`: the compiled modules and the
modules whose types they were compiled against).  The pure-Python modules
stay the reference and the fallback.

Design: the build never sits next to the ``.py`` files.  An extension module
there (as an in-place or editable build would leave it) takes import
precedence over the source and keeps running after the source changed.  In
``_compiled/`` it is importable only once ``detectors/__init__.py`` puts that
folder in front of the package's ``__path__``, which it does only when the
build matches the sources byte for byte (and this Python's extension suffix).
Otherwise the whole group falls back to the sources, with one line on stderr:
modules of a mypyc group call each other natively, so one changed module makes
the whole group stale.  ``TOKENWARD_PURE_PYTHON=1`` forces the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

# compiled together, as one mypyc group (order: imported before importers)
MODULES = ("record", "volume", "baselines", "reliability", "state", "episodes", "engine")
# mypyc's shared library of the group: detectors/_compiled/native__mypyc.<suffix>
GROUP = "detectors.native"
# sources a build depends on, relative to the repository root: the compiled
# modules and the first-party modules whose types mypyc compiled them against
SOURCES = (*(f"detectors/{m}.py" for m in MODULES),
           "detectors/config.py", "detectors/finding.py", "ingest/event.py")
BUILD_DIR = "_compiled"
MANIFEST = "BUILD.json"
FORMAT = 1


def ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of each file of :data:`SOURCES` under the repository root."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in SOURCES}


def expected_files() -> list[str]:
    suf = ext_suffix()
    return [GROUP.rsplit(".", 1)[1] + "__mypyc" + suf] + [m + suf for m in MODULES]


def manifest(root: Path, mypy_version: str) -> dict[str, object]:
    return {"format": FORMAT, "ext_suffix": ext_suffix(), "mypy": mypy_version,
            "modules": list(MODULES), "files": expected_files(), "sources": digests(root)}


def check(pkg_dir: Path) -> tuple[Path | None, str | None]:
    """(the build folder, None) when the build can be used; (None, None)
    when there is no build; (None, why) when there is one that must not run."""
    build = pkg_dir / BUILD_DIR
    try:
        info = json.loads((build / MANIFEST).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"unreadable {MANIFEST} ({e})"
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return None, "built by another version of tools/build_compiled.py"
    if info.get("ext_suffix") != ext_suffix():
        return None, f"built for another Python ({info.get('ext_suffix')})"
    if info.get("modules") != list(MODULES):
        return None, "built from another list of modules"
    for f in expected_files():
        if not (build / f).is_file():
            return None, f"{BUILD_DIR}/{f} is missing"
    try:
        now = digests(pkg_dir.parent)
    except OSError as e:
        return None, f"cannot read the sources ({e})"
    built = info.get("sources")
    changed = [rel for rel in SOURCES if not isinstance(built, dict) or built.get(rel) != now[rel]]
    if changed:
        return None, ", ".join(changed) + " changed since the build"
    return build, None


def disabled() -> bool:
    return os.environ.get("TOKENWARD_PURE_PYTHON", "") not in ("", "0")
