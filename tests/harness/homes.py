"""Where a test's strato keeps its local state (``$STRATO_HOME``), in one place.

Fixtures:
- ``strato_home``: a fresh ``$STRATO_HOME`` under the test's ``tmp_path``.
- ``short_strato_home``: one directly under ``/tmp`` (local clusters put node sockets
  under it, and unix socket paths are limited to 107 bytes); at teardown every cluster
  still recorded there is taken down, so a failed test leaves no process behind.
- ``monitor_off``: ``STRATO_MONITOR=off`` for cloud tests whose head has no cloud
  credentials (or that drive the autoscaler themselves).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def strato_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("STRATO_HOME", str(home))
    return home


@pytest.fixture
def short_strato_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    monkeypatch.setenv("STRATO_HOME", str(home))
    yield home
    import strato
    from strato.launcher import reconcile
    from strato.launcher.state import StateDB

    with contextlib.suppress(Exception):
        strato.shutdown()
    for cluster in StateDB(home).list():
        with contextlib.suppress(Exception):
            reconcile.down(cluster.config_path, yes=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def monitor_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATO_MONITOR", "off")
