"""Fixtures shared by every test.

The embedded ClickHouse engine binds ONE data folder per process, so all
in-process tests share one folder (``chdb_dir``); the ``store`` fixture empties
the tables before each test so tests stay independent.  Tests that need their
own folder run ``tokenward`` in a subprocess.
"""

from __future__ import annotations

import os

import pytest

import detectors

# With the compiled build (detectors/compiled.py), detectors.engine & co. are
# extension modules from detectors/_compiled/: the doctests of
# detectors/engine.py etc. then run against the compiled code, and pytest's
# check that the module it imported is that file must not stop them.
if detectors.IMPLEMENTATION == "compiled":
    os.environ.setdefault("PY_IGNORE_IMPORTMISMATCH", "1")

TABLES = ("usage_events", "usage_1m", "findings", "blocks", "rejected_events", "detector_state")


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A server run (TOKENWARD_TEST_CLICKHOUSE_URL) shares all SQL with this path.
    return str(tmp_path_factory.mktemp("chdb"))


@pytest.fixture
def store(chdb_dir: str):
    from ingest.store import open_store

    url = os.environ.get("TOKENWARD_TEST_CLICKHOUSE_URL")
    st = open_store(chdb_dir, url)
    for t in TABLES:
        st.backend.command(f"TRUNCATE TABLE IF EXISTS tokenward.{t}")
    yield st


# chdb 4.4 can crash in its own background threads while the process shuts down
# ("Exception in global_context->shutdown()", then SIGSEGV), after every test
# has passed and been reported.  Leave with pytest's own exit status once the
# run is fully reported, skipping the engine's teardown.
_exit_status = {"code": 0}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    import sys

    if "chdb" in sys.modules and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
