"""The compiled (mypyc) build of the detectors against the pure-Python sources.

Each implementation runs in its own interpreter (``TOKENWARD_PURE_PYTHON=1``
forces the sources): the same simulated hour must give byte-identical
findings, and a snapshot taken by either must restore in the other and go on
to the same findings.  Without a usable build these tests skip, except where
the build is expected (``CI`` or ``TOKENWARD_REQUIRE_COMPILED`` set): there a
missing or stale build fails.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = bool(os.environ.get("CI") or os.environ.get("TOKENWARD_REQUIRE_COMPILED"))


def _env(pure: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TOKENWARD_PURE_PYTHON"}
    if pure:
        env["TOKENWARD_PURE_PYTHON"] = "1"
    return env


def _implementation(pure: bool = False, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    code = "import detectors; print(detectors.IMPLEMENTATION)"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(pure),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def build() -> Path:
    """The usable build (skips, or fails where the build is expected)."""
    from detectors import compiled

    path, why = compiled.check(ROOT / "detectors")
    if path is None:
        msg = (f"no usable compiled build ({why or 'none built'}); "
               "run python tools/build_compiled.py")
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    r = _implementation()
    assert r.stdout.strip() == "compiled", r.stderr
    return path


# ------------------------------------------------------------ equivalence
def _run(events: Path, out: Path, pure: bool, *args: str) -> str:
    r = subprocess.run([sys.executable, __file__, str(events), str(out), *args], cwd=ROOT,
                       env=_env(pure), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated hour with every anomaly kind, validated and priced."""
    from ingest.event import Accepted, validate_event
    from ingest.pricing import PriceTable
    from ingest.simulator import SimConfig, Simulation

    table = PriceTable.load()
    evs = []
    for d in Simulation(SimConfig(seed=7, duration_s=3600, n_consumers=80)).events():
        r = validate_event(d)
        assert isinstance(r, Accepted)
        ev = r.event
        if ev.cost is None:
            ev = ev.model_copy(update={"cost": table.cost(ev)[0]})
        evs.append(ev)
    path = tmp_path_factory.mktemp("compiled") / "events.pkl"
    path.write_bytes(pickle.dumps(evs))
    return path


def test_compiled_findings_are_identical(build: Path, events: Path, tmp_path: Path) -> None:
    out = {}
    for name, pure in (("interpreted", True), ("compiled", False)):
        assert _run(events, tmp_path / name, pure) == name
        out[name] = (tmp_path / name).read_bytes()
    findings = json.loads(out["compiled"])
    assert len(findings) > 20  # the hour has anomalies of every kind
    assert len({f["kind"] for f in findings}) >= 5
    assert out["compiled"] == out["interpreted"]


def test_compiled_findings_are_identical_on_extreme_events(build: Path,
                                                           tmp_path: Path) -> None:
    """Schema limits, clock jumps and bursts at one timestamp (see
    tests/detectors/extreme.py) reach branches an hour of traffic does not:
    native integer and float arithmetic must agree with Python's there too."""
    from .extreme import extreme_events

    events = tmp_path / "extreme.pkl"
    events.write_bytes(pickle.dumps(extreme_events(4, 20_000)))
    out = {}
    for name, pure in (("interpreted", True), ("compiled", False)):
        assert _run(events, tmp_path / name, pure) == name
        out[name] = (tmp_path / name).read_bytes()
    assert len({f["kind"] for f in json.loads(out["compiled"])}) >= 3
    assert out["compiled"] == out["interpreted"]


def test_snapshots_restore_across_implementations(build: Path, events: Path,
                                                   tmp_path: Path) -> None:
    """Half the hour in one implementation, snapshot, the rest in the other."""
    whole = tmp_path / "whole"
    _run(events, whole, True)
    for first, then in ((True, False), (False, True)):
        snap, out = tmp_path / f"snap-{first}", tmp_path / f"out-{first}"
        _run(events, out, first, "--snapshot-at-half", str(snap))
        _run(events, out, then, "--restore", str(snap))
        assert out.read_bytes() == whole.read_bytes()


# --------------------------------------------------------------- staleness
def test_check_reports_changed_sources(tmp_path: Path) -> None:
    """No build: not used, silently; a build whose sources changed: not used,
    with the reason (the check itself, on a fake build)."""
    from detectors import compiled

    for rel in compiled.SOURCES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    pkg = tmp_path / "detectors"
    assert compiled.check(pkg) == (None, None)
    b = pkg / compiled.BUILD_DIR
    b.mkdir()
    for name in compiled.expected_files():
        (b / name).write_bytes(b"")
    (b / compiled.MANIFEST).write_text(json.dumps(compiled.manifest(tmp_path, "test")))
    assert compiled.check(pkg) == (b, None)
    with (pkg / "volume.py").open("a") as f:
        f.write("# changed\n")
    path, why = compiled.check(pkg)
    assert path is None and why == "detectors/volume.py changed since the build"
    shutil.copy(ROOT / "detectors/volume.py", pkg / "volume.py")
    (b / compiled.expected_files()[0]).unlink()
    path, why = compiled.check(pkg)
    assert path is None and why is not None and "missing" in why


def test_stale_build_never_runs(build: Path, tmp_path: Path) -> None:
    """A copy of the tree with the build: compiled as is; once a compiled
    module's source changes, the whole group runs from the sources, with one
    line on stderr."""
    for d in ("detectors", "ingest"):
        shutil.copytree(ROOT / d, tmp_path / d,
                        ignore=shutil.ignore_patterns("__pycache__", "*.new", "*.old"))
    r = _implementation(cwd=tmp_path)
    assert (r.stdout.strip(), r.stderr) == ("compiled", "")
    with (tmp_path / "detectors" / "engine.py").open("a") as f:
        f.write("\n# an edit after the build\n")
    r = _implementation(cwd=tmp_path)
    assert r.stdout.strip() == "interpreted"
    assert r.stderr.count("\n") == 1 and "engine.py changed since the build" in r.stderr
    r = _implementation(pure=True, cwd=ROOT)
    assert (r.stdout.strip(), r.stderr) == ("interpreted", "")


def test_an_installed_copy_uses_the_build(build: Path, tmp_path: Path) -> None:
    """``pip install .`` of a tree with a build installs the build with the
    sources (package data), and the installed package uses it: what the
    service image relies on (deploy/Dockerfile)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for d in ("ingest", "detectors", "alerting", "api"):
        shutil.copytree(ROOT / d, src / d,
                        ignore=shutil.ignore_patterns("__pycache__", "*.new", "*.old"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (site / "detectors" / "_compiled").iterdir()) == sorted(
        p.name for p in build.iterdir())
    code = "import detectors; print(detectors.__file__, detectors.IMPLEMENTATION)"
    env = {**_env(False), "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    where, impl = r.stdout.split()
    assert Path(where).is_relative_to(site) and impl == "compiled", r.stderr


def test_pip_install_compiles_the_detectors(tmp_path: Path) -> None:
    """The quick start's ``pip install .`` of a tree without a build
    compiles the detectors while it builds the wheel (setup.py runs
    tools/build_compiled.py), and the installed package uses them; a tree
    whose compile fails (no C compiler) still installs, as pure Python."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / f, src / f)
    (src / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "build_compiled.py", src / "tools" / "build_compiled.py")
    for d in ("ingest", "detectors", "alerting", "api"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns(
            "__pycache__", "_compiled", "*.new", "*.old"))
    env = _env(False)
    if shutil.which(env.get("CC") or "cc") is None and shutil.which("gcc") is None:
        if REQUIRED:
            pytest.fail("no C compiler: scripts/test.sh installs gcc")
        pytest.skip("no C compiler")
    for name, cc, want in (("site", None, "compiled"), ("pure", "/nonexistent/cc", "interpreted")):
        site = tmp_path / name
        shutil.rmtree(src / "detectors" / "_compiled", ignore_errors=True)
        shutil.rmtree(src / "build", ignore_errors=True)
        e = {**env, "CC": cc} if cc else env
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--target", str(site), str(src)],
                           env=e, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        code = "import detectors; print(detectors.__file__, detectors.IMPLEMENTATION)"
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                           env={**env, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, timeout=120)
        where, impl = r.stdout.split()
        assert Path(where).is_relative_to(site) and impl == want, r.stderr


def test_doctests_of_the_sources(build: Path) -> None:
    """With the build loaded, pytest sees the compiled modules, whose
    functions and classes carry no collectable doctests: run them on the
    sources too."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--doctest-modules", "detectors"], cwd=ROOT, env=_env(True),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]


# ------------------------------------------------------ the run, as a script
def _main(argv: list[str]) -> int:
    """events.pkl out.json [--snapshot-at-half SNAP | --restore SNAP]: run the
    events through an engine, write its findings as JSON; print which
    implementation ran."""
    import detectors
    from detectors import Engine

    events, out = Path(argv[0]), Path(argv[1])
    mode, snap = (argv[2], Path(argv[3])) if len(argv) > 2 else (None, None)
    evs = pickle.loads(events.read_bytes())
    half = len(evs) // 2
    start, stop = 0, len(evs)
    eng = Engine()
    found: list[Any] = []
    if mode == "--snapshot-at-half":
        stop = half
    elif mode == "--restore":
        assert snap is not None
        eng = Engine.restore(snap.read_bytes())
        found = json.loads(out.read_text())
        start = half
    mx = max(ev.ts for ev in evs[:start + 1])
    for i in range(start, stop):
        ev = evs[i]
        found.extend(f.to_json_dict() for f in eng.observe(ev))
        mx = max(mx, ev.ts)
        if i % 500 == 499:
            found.extend(f.to_json_dict() for f in eng.advance(mx))
    if mode == "--snapshot-at-half":
        assert snap is not None
        snap.write_bytes(eng.snapshot())
    out.write_text(json.dumps(found, sort_keys=True))
    print(detectors.IMPLEMENTATION)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(_main(sys.argv[1:]))


def test_the_detectors_docstring_examples_run_on_the_sources():
    """With a fresh compiled build, ``--doctest-modules`` imports the
    compiled modules and finds no examples in them, so the suite alone would
    skip the docstring examples of every compiled module (episodes, volume,
    reliability, ...).  They run here on the sources, in an interpreter of
    their own."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                        "--doctest-modules", "detectors"], cwd=ROOT, env=_env(pure=True),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    # each compiled module's examples ran (a module no longer searched would
    # otherwise pass unnoticed)
    for module in ("baselines", "engine", "episodes", "record", "reliability", "state",
                   "volume"):
        assert f"detectors/{module}.py::" in r.stdout and " PASSED" in r.stdout, module
