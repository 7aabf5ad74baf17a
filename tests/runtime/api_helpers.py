"""Small helpers the runtime's API tests share (importable by worker processes)."""

from __future__ import annotations

import os
import time


class MyError(Exception):
    """A user exception type; must survive the trip back as itself."""


def wait_for_file(path: str, timeout: float = 30.0) -> None:
    """Block (in a task) until ``path`` exists; bounded."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {path} never appeared")
        time.sleep(0.02)


def touch(path) -> None:
    with open(path, "w"):
        pass
