"""Checkpoints kept on the head's disk, so a replacement for a preempted worker resumes
from the last one (``strato.checkpoint``). A mixin of ``HeadService``."""

from __future__ import annotations

import hashlib
import os

from strato.localfiles import atomic_write


class Checkpoints:
    storage_dir: str | None

    def _checkpoint_path(self, key: str) -> str:
        if not self.storage_dir:
            raise RuntimeError("this head has no checkpoint storage directory")
        os.makedirs(self.storage_dir, exist_ok=True)
        return os.path.join(self.storage_dir, hashlib.sha256(key.encode()).hexdigest())

    def rpc_checkpoint_save(self, key: str, data: bytes) -> int:
        """Write atomically to the head's disk, so a replacement worker can resume."""
        atomic_write(self._checkpoint_path(key), data)
        return len(data)

    def rpc_checkpoint_load(self, key: str):
        try:
            with open(self._checkpoint_path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def rpc_checkpoint_delete(self, key: str) -> bool:
        try:
            os.unlink(self._checkpoint_path(key))
            return True
        except FileNotFoundError:
            return False
