"""Leased workers, the caller's side (a mixin of ``CoreWorker``): a pool worker its agent
lends to one caller for tasks of one resource shape, so the caller's next tasks of that
shape go straight to the worker (Ray's worker leases; the channel is ``runtime.direct``'s).

- *Asking.* A task that may go direct (no ref arguments, no retry on exceptions, a
  shape the caller holds no lease for) rides with WANT_LEASE. When such a task finishes
  on a worker of this node and no other task of its shape waits there, the agent keeps
  the worker leased (its resources stay taken) and lends it (LEASE, before the RESULT).
- *Using.* One task at a time goes to a lease: the next one only after the result came.
  So a leased worker never queues work behind a task that blocks in ``get``, and more
  tasks than that go through the agent, which spreads them over its workers.
- *Giving back.* A lease unused for ``LEASE_IDLE_S`` goes back (LEASE_RETURN); so does
  one the agent revokes (LEASE_REVOKE) because other tasks wait for its resources, once
  its task is done. A caller that exits gives all back; a worker that dies ends its
  lease, and the agent retries or fails the task it ran (DIRECT_LOST). Leased workers
  are known by their worker ids, never their pids: a pid (and the socket path made
  from it) may belong to another worker process by the time it is used again.
"""

from __future__ import annotations

import threading
import time

from strato.runtime import messages as m
from strato.runtime.spec import TaskSpec

LEASE_IDLE_S = 0.05    # a lease unused this long goes back to the agent
ASK_AGAIN_S = 1.0      # a shape asked for and not granted: ask again after this


class Lease:
    __slots__ = ("key", "worker_id", "path", "pid", "chan", "busy", "revoked", "last")

    def __init__(self, key: tuple, worker_id: bytes, path: str, pid: int):
        self.key = key
        self.worker_id = worker_id
        self.path = path
        self.pid = pid
        self.chan = None                 # DirectChannel, connected on first use
        self.busy: bytes | None = None   # the task id running on it
        self.revoked = False
        self.last = time.monotonic()


class TaskLeasing:
    """The ``CoreWorker`` state and methods of leased workers (see the module doc)."""

    def _init_leases(self) -> None:
        self.leases: dict[tuple, Lease] = {}        # shape key -> lease held
        self._lease_asked: dict[tuple, float] = {}  # shape key -> when asked
        self._lease_lock = threading.Lock()
        self._lease_wake = threading.Event()
        self._lease_keeper: threading.Thread | None = None
        self.fn_blobs: dict[bytes, bytes] = {}      # exported functions, for leased workers

    def submit_task(self, spec: TaskSpec, key: tuple | None) -> None:
        """Send a task: to a leased worker when one of its shape is free (``key`` None:
        this task must go through the agent), else to the agent."""
        from strato.runtime.direct import ENABLED

        if key is not None and ENABLED and not self.remote:
            lease = None
            with self._lease_lock:
                held = self.leases.get(key)
                if held is not None and held.busy is None and not held.revoked:
                    held.busy = spec.task_id
                    lease = held
            if lease is not None:
                if self._send_leased(lease, spec):
                    return
            elif held is None:
                now = time.monotonic()
                if now - self._lease_asked.get(key, -ASK_AGAIN_S) >= ASK_AGAIN_S:
                    self._lease_asked[key] = now
                    self.conn.send_many([(m.WANT_LEASE, key), (m.SUBMIT, [spec])])
                    return
        self.send((m.SUBMIT, [spec]))

    def _send_leased(self, lease: Lease, spec: TaskSpec) -> bool:
        chan = self._lease_channel(lease)
        if chan is not None:
            fns = None
            if spec.function_id not in chan.sent_fns:
                fns = {spec.function_id: self.fn_blobs.get(spec.function_id)}
                chan.sent_fns.add(spec.function_id)
            with self._direct_lock:
                self.direct_pending.update(spec.return_ids)
            self.pending_chan[spec.task_id] = chan
            if chan.send(spec, fns):
                return True
            self.pending_chan.pop(spec.task_id, None)
            with self._direct_lock:
                self.direct_pending.difference_update(spec.return_ids)
        with self._lease_lock:
            lease.busy = None
        return False

    def _lease_channel(self, lease: Lease):
        from strato.runtime.direct import DirectChannel

        chan = lease.chan
        if chan is not None and not chan.lost:
            return chan
        chan = self.worker_channels.get(lease.path)
        if chan is None or chan.lost or chan.worker_id != lease.worker_id:
            if chan is not None:
                # a process gone since, whose pid (so its socket path) this worker
                # reuses: an idle channel's reader sleeps and may not have seen the end
                chan.abandon()
            try:
                chan = DirectChannel(self, None, lease.path, lease.pid, lease.worker_id)
            except OSError:   # the worker went away meanwhile
                self._return_lease(lease)
                return None
            self.worker_channels[lease.path] = chan
        lease.chan = chan
        return chan

    # ------------------------------------------------------------------ from the agent
    def _on_lease(self, msg) -> None:
        _, key, worker_id, path, pid = msg
        lease = Lease(key, worker_id, path, pid)
        with self._lease_lock:
            if key in self.leases or self.closed:
                lease = None
            else:
                self.leases[key] = lease
                self._lease_asked.pop(key, None)
        if lease is None:    # one of that shape is held already: this one goes back
            self.send((m.LEASE_RETURN, worker_id))
            return
        if self._lease_keeper is None:
            self._lease_keeper = threading.Thread(target=self._keep_leases,
                                                  name="strato-leases", daemon=True)
            self._lease_keeper.start()
        self._lease_wake.set()

    def _on_lease_revoke(self, msg) -> None:
        worker_id = msg[1]
        for lease in list(self.leases.values()):
            if lease.worker_id == worker_id:
                lease.revoked = True
                self._return_lease(lease, idle_for=0.0)

    # ------------------------------------------------------------------ results, losses
    def lease_done(self, chan, returns: list) -> None:
        """A leased worker answered (the first return id is the task id)."""
        tid = returns[0].oid if returns else None
        for lease in list(self.leases.values()):
            if lease.chan is chan and lease.busy == tid:
                with self._lease_lock:
                    lease.busy = None
                    lease.last = time.monotonic()
                if lease.revoked:
                    self._return_lease(lease)
                return

    def lease_lost(self, chan) -> None:
        """The worker of a channel went away: its leases end (the agent frees them)."""
        for lease in list(self.leases.values()):
            if lease.chan is chan or lease.worker_id == chan.worker_id:
                self._return_lease(lease)
        if self.worker_channels.get(chan.path) is chan:
            del self.worker_channels[chan.path]

    def _return_lease(self, lease: Lease, idle_for: float | None = None) -> None:
        """Give ``lease`` back (``idle_for``: only if no task runs on it and none ran for
        that many seconds; checked under the lock a sender takes it with)."""
        with self._lease_lock:
            if self.leases.get(lease.key) is not lease:
                return
            if idle_for is not None and (lease.busy is not None
                                         or time.monotonic() - lease.last < idle_for):
                return
            del self.leases[lease.key]
        if not self.closed:
            self.send((m.LEASE_RETURN, lease.worker_id))

    def _keep_leases(self) -> None:
        """Give back leases left unused for LEASE_IDLE_S (sleeps while none is held)."""
        while not self.closed:
            if not self.leases:
                self._lease_wake.wait()
                self._lease_wake.clear()
                continue
            time.sleep(LEASE_IDLE_S / 2)
            for lease in list(self.leases.values()):
                self._return_lease(lease, idle_for=LEASE_IDLE_S)
