"""Direct calls, the worker's side: every worker process listens on a unix socket next
to its agent's (same directory, same permissions) and takes calls from callers on the
node: an actor's calls (``runtime.direct``) and tasks from the caller it is leased to
(``runtime.leases``). They join the same queue as what the agent sends, so an actor runs
them one at a time (or as its concurrency allows) either way.

The worker's main thread reads these sockets itself when it has nothing to run (a
``select`` over them and a wake-up pipe the agent's reader pokes), so a direct call wakes
one thread, the one that runs it, instead of a reader thread that hands it over. While
the main thread runs a call nothing reads them: callers never block on that (their
channel queues what the socket does not take, see ``runtime.direct``), and what must
reach a busy worker (a cancel of the running task) goes through the agent's connection.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading

from strato.runtime import messages as m
from strato.runtime.protocol.framing import encode, take_frames
from strato.runtime.spec import ACTOR_CALL, TaskSpec

log = logging.getLogger("strato.worker")
_MAX_PATH = 100      # sun_path holds 108 bytes; longer: no direct calls, the agent routes
MAX_DIRECT_FRAME = 256 << 20   # a call, its inline arguments and a function: far less
_READ = 1 << 20


class DirectCaller:
    """One connected caller: its socket, what it sent that is not a whole frame yet."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.closed = False
        self.template: TaskSpec | None = None   # its last actor call sent in full
        self._lock = threading.Lock()     # replies come from pool threads too

    def send(self, msg) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self.sock.sendall(encode([msg]))
            except OSError:
                self.closed = True

    def read(self) -> list | None:
        """The messages of every whole frame that arrived; None: it disconnected (or
        sent what is no frame of this protocol)."""
        try:
            data = self.sock.recv(_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buf += data
        try:
            return take_frames(self.buf, MAX_DIRECT_FRAME)
        except Exception:       # no frame of this protocol
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _actor_call(t: TaskSpec, msg: tuple) -> TaskSpec:
    """A DIRECT_ACTOR_CALL's spec: what it carries, the rest from the caller's template."""
    _, task_id, method, args, return_ids, seq = msg
    name = t.name[:len(t.name) - len(t.method or "")] + method
    return TaskSpec(task_id, ACTOR_CALL, t.job_id, t.owner_node, t.owner_client, b"", name,
                    args, [], return_ids, {}, 0, False, t.actor_id, method, t.actor_options,
                    0, seq)


class DirectHost:
    """The worker's listening socket and the callers connected to it, read by
    ``poll`` on the thread that runs their calls."""

    def __init__(self, socket_dir: str):
        self.path: str | None = None
        self.waiting = False           # poll() is (about to be) blocked in select
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
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
            sock.setblocking(False)
        except OSError as exc:
            log.warning("no direct calls to this worker (%s): the agent routes them", exc)
            sock.close()
            return
        self._sock = sock
        self._sel.register(sock, selectors.EVENT_READ, None)
        self.path = path

    def wake(self) -> None:
        """Another thread queued work: end a ``poll`` blocked in select."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:   # full (a wake is pending anyway)
            pass

    def poll(self, on_calls, on_cancel, on_gone) -> None:
        """Wait until a caller sends something or ``wake`` is called; hand on what came:
        ``on_calls(caller, [TaskSpec], fns)``, ``on_cancel(task_id)``, ``on_gone(caller)``."""
        for key, _ in self._sel.select():
            what = key.data
            if what == "wake":
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except OSError:
                    pass
            elif what is None:
                self._accept()
            else:
                msgs = what.read()
                if msgs is None:
                    self._drop(what, on_gone)
                    continue
                for msg in msgs:
                    kind = msg[0] if type(msg) is tuple and msg else None
                    if kind == m.DIRECT_ACTOR_CALL and len(msg) == 6 \
                            and what.template is not None and type(msg[1]) is bytes \
                            and type(msg[2]) is str and type(msg[3]) is bytes \
                            and type(msg[4]) is list and type(msg[5]) is int:
                        on_calls(what, [_actor_call(what.template, msg)], None)
                    elif kind == m.DIRECT_CALLS and len(msg) == 3 and type(msg[1]) is list \
                            and all(type(s) is TaskSpec for s in msg[1]) \
                            and (msg[2] is None or type(msg[2]) is dict):
                        if msg[1][-1].kind == ACTOR_CALL:
                            what.template = msg[1][-1]
                        on_calls(what, msg[1], msg[2])
                    elif kind == m.CANCEL_EXEC:
                        on_cancel(msg[1])
                    else:   # not a caller speaking this protocol
                        self._drop(what, on_gone)
                        break

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(True)     # replies block; reads use MSG_DONTWAIT
            self._sel.register(conn, selectors.EVENT_READ, DirectCaller(conn))

    def _drop(self, caller: DirectCaller, on_gone) -> None:
        try:
            self._sel.unregister(caller.sock)
        except (KeyError, ValueError, OSError):
            pass
        caller.close()
        on_gone(caller)
