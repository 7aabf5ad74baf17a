"""Task retries (worker crashes, retried exceptions) and cancel, on the embedded cluster."""

from __future__ import annotations

import os
import time

import pytest

from strato import exceptions as exc
from tests.harness.runtime_cluster import wait_until
from tests.runtime.api_helpers import MyError, touch, wait_for_file

pytestmark = pytest.mark.timeout(60)


def test_max_retries_after_worker_crash(strato_local, tmp_path):
    strato = strato_local
    marker = str(tmp_path / "crashed-once")

    @strato.remote(max_retries=2)
    def crash_once(path):
        if not os.path.exists(path):
            touch(path)
            os._exit(1)
        return "survived"

    assert strato.get(crash_once.remote(marker), timeout=30) == "survived"


def test_worker_crash_without_retries(strato_local):
    strato = strato_local

    @strato.remote(max_retries=0)
    def crash():
        os._exit(1)

    with pytest.raises(exc.WorkerCrashedError):
        strato.get(crash.remote(), timeout=30)

    @strato.remote
    def ok():
        return "pool recovered"

    assert strato.get(ok.remote(), timeout=30) == "pool recovered"


def test_retry_exceptions(strato_local, tmp_path):
    strato = strato_local

    @strato.remote
    def flaky(path, exc_type):
        if not os.path.exists(path):
            touch(path)
            raise exc_type("first attempt fails")
        return "second attempt"

    m1, m2, m3 = (str(tmp_path / n) for n in ("m1", "m2", "m3"))
    assert strato.get(flaky.options(max_retries=1, retry_exceptions=True).remote(m1, MyError),
                      timeout=30) == "second attempt"
    # without retry_exceptions an application error is not retried
    with pytest.raises(MyError):
        strato.get(flaky.options(max_retries=3).remote(m2, MyError), timeout=30)
    # a list retries only the listed types
    with pytest.raises(KeyError):
        strato.get(flaky.options(max_retries=3, retry_exceptions=[MyError]).remote(m3, KeyError),
                   timeout=30)
    m4 = str(tmp_path / "m4")
    assert strato.get(flaky.options(max_retries=1, retry_exceptions=[MyError]).remote(m4, MyError),
                      timeout=30) == "second attempt"


def test_cancel_sleeping_task(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=0)
    def sleeper(path):
        touch(path)
        time.sleep(30)
        return "not cancelled"

    ref = sleeper.remote(started)
    try:
        wait_until(lambda: os.path.exists(started), 30, message="the task to start")
        t0 = time.monotonic()
        strato.cancel(ref)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(ref, timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        strato.cancel(ref, force=True)  # no sleeping worker left behind if this failed


def test_cancel_busy_loop_task(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=0)
    def spinner(path):
        touch(path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "not cancelled"

    ref = spinner.remote(started)
    try:
        wait_until(lambda: os.path.exists(started), 30, message="the task to start")
        strato.cancel(ref)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(ref, timeout=10)
    finally:
        strato.cancel(ref, force=True)


def test_cancel_force(strato_local, tmp_path):
    strato = strato_local
    started = str(tmp_path / "started")

    @strato.remote(max_retries=3)
    def stubborn(path):
        touch(path)
        while True:  # ignores KeyboardInterrupt: only force can stop it
            try:
                time.sleep(30)
                return "not cancelled"
            except KeyboardInterrupt:
                pass

    ref = stubborn.remote(started)
    wait_until(lambda: os.path.exists(started), 30, message="the task to start")
    strato.cancel(ref, force=True)
    with pytest.raises(exc.TaskCancelledError):  # not retried although max_retries=3
        strato.get(ref, timeout=20)

    @strato.remote
    def ok():
        return "ok"

    assert strato.get(ok.remote(), timeout=30) == "ok"


def test_cancel_queued_task(strato_local, tmp_path):
    strato = strato_local
    gate = str(tmp_path / "gate")

    @strato.remote
    def blocked(path):
        wait_for_file(path)
        return "ran"

    holders = [blocked.remote(gate) for _ in range(2)]  # both CPUs busy
    queued = blocked.remote(gate)
    try:
        strato.cancel(queued)
        with pytest.raises(exc.TaskCancelledError):
            strato.get(queued, timeout=10)
    finally:
        touch(gate)
    assert strato.get(holders, timeout=30) == ["ran", "ran"]
