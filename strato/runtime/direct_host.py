"""Direct calls, the worker's side: every worker process listens on a unix socket next
to its agent's (same directory, same permissions) and takes calls from callers on the
node: an actor's calls (``runtime.direct``) and tasks from the caller it is leased to
(``runtime.leases``). They join the same queue as what the agent sends, so an actor runs
them one at a time (or as its concurrency allows) either way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from strato.runtime import messages as m
from strato.runtime.protocol.framing import FrameClient

log = logging.getLogger("strato.worker")
_MAX_PATH = 100      # sun_path holds 108 bytes; longer: no direct calls, the agent routes


class DirectHost:
    """The listening socket of an actor's worker and the callers connected to it."""

    def __init__(self, on_calls, on_cancel, on_gone, socket_dir: str):
        self._on_calls = on_calls        # (FrameClient, [TaskSpec], {fid: blob} | None)
        self._on_cancel = on_cancel      # (task_id)
        self._on_gone = on_gone          # (FrameClient): it disconnected
        self.path: str | None = None
        path = os.path.join(socket_dir, f"worker-{os.getpid()}.sock")
        if len(path.encode()) > _MAX_PATH:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)          # a dead process's, whose pid this one reuses
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(64)
        except OSError as exc:
            log.warning("no direct calls for this actor (%s): the agent routes them", exc)
            sock.close()
            return
        self._sock = sock
        self.path = path
        threading.Thread(target=self._accept_loop, name="strato-direct-accept",
                         daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            holder: list = []
            client = FrameClient(conn, lambda batch, h=holder: self._on_batch(h[0], batch),
                                 lambda h=holder: self._on_gone(h[0]), name="strato-direct-in")
            holder.append(client)
            client.start()

    def _on_batch(self, client: FrameClient, batch: list) -> None:
        for msg in batch:
            kind = msg[0]
            if kind == m.DIRECT_CALLS:
                self._on_calls(client, msg[1], msg[2])
            elif kind == m.CANCEL_EXEC:
                self._on_cancel(msg[1])
            else:   # not a caller speaking this protocol: drop it
                client.close()
                return
