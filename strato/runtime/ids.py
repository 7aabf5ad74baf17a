"""Compact unique ids: a per-process random prefix plus a counter (cheap, collision-free)."""

from __future__ import annotations

import itertools
import os


class IdFactory:
    """Makes 16-byte ids: 8 random bytes fixed per factory, 8 bytes of counter. A
    process's ids start with its client id's first 8 bytes (``prefix``), so an agent
    can tell an object whose owning process exited from one never made."""

    def __init__(self, prefix: bytes | None = None):
        self.prefix = prefix if prefix is not None else os.urandom(8)
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return self.prefix + next(self._counter).to_bytes(8, "little")
