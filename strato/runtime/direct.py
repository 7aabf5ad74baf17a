"""Direct actor calls, the caller's side: calls go straight to the actor's worker process
when it runs on the caller's node (Ray's direct actor calls), a mixin of ``CoreWorker``.

Through the agent a call takes four hops (caller, agent, worker, agent, caller) and two
passes through the agent's event loop; straight to the worker it takes two. The agent
stays in charge of what needs it:

- *Where.* The caller asks its agent once per actor (ACTOR_WHERE); the agent answers with
  the unix socket the actor's worker listens on (ACTOR_HERE), or none: the actor lives on
  another node, is not ready, or the caller is a remote driver. Then calls go through the
  agent as before, and the caller asks again after ``ASK_AGAIN_S``.
- *Order.* A handle's calls run in the order made. The caller switches to the direct
  channel only when none of its calls to that actor is still on the way through the
  agent, and back to the agent (DIRECT_LOST first, then new calls) when the channel drops.
- *Failures.* When the worker process dies, the calls in flight on its channel go to the
  agent (DIRECT_LOST), which retries them on the restarted actor within
  ``max_task_retries`` or fails them with the actor's error, as for calls it routed.
- *Objects.* A direct call's small result lives only in the caller until its ref escapes
  (an argument of another task, inside a put or a result): then the caller hands it to
  the agent (the REF_ADOPT op, ahead of the message it escapes in). A result in the
  store, or one holding refs, the worker registers with the agent before answering.

- *Reading.* A thread waiting in ``get``/``wait`` only for direct results reads their
  channel itself (it takes the channel's token), so a sync call costs one wakeup on
  each side; the channel's own reader thread reads when nobody waits (it looks every
  10 ms while calls are in flight, and sleeps while none is), so results never pile up
  in the socket and a dead worker is noticed. Sending never blocks: what the socket
  does not take waits in the channel and a thread sends it in order (the worker reads
  only between the calls it runs).

Calls with ref arguments (top-level or nested) keep going through the agent, which
resolves and pins them.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from strato.runtime import messages as m
from strato.runtime.messages import AT_NODE, ERROR, INLINE, RESULT
from strato.runtime.protocol.framing import encode, take_frames
from strato.runtime.spec import ACTOR_CALL, TaskSpec

ASK_AGAIN_S = 1.0          # an actor not reachable directly: ask the agent again after this
#: ``STRATO_DIRECT_CALLS=0``: every actor call goes through the agent (to compare, or to
#: rule direct calls out when chasing a problem)
ENABLED = os.environ.get("STRATO_DIRECT_CALLS", "1") != "0"
_ASKED = "asked"
_AT = "at"


class DirectChannel:
    """One caller's connection to one worker process on the same node: an actor's, or a
    pool worker the agent leased to the caller (``runtime.leases``, ``actor_id`` None)."""

    def __init__(self, core, actor_id: bytes | None, path: str, pid: int,
                 worker_id: bytes | None = None):
        self.core = core
        self.actor_id = actor_id
        # a leased worker's id: pids (and so socket paths) are reused, worker ids never
        self.worker_id = worker_id
        self.sent_fns: set = set()     # functions this worker got from this caller
        self.path = path
        self.pid = pid
        self.inflight: dict[bytes, TaskSpec] = {}   # task id -> spec sent, not answered
        self.lost = False
        self._lock = threading.Lock()
        self._backlog: list | None = None     # bytes the socket did not take yet
        self._template: TaskSpec | None = None  # an actor call sent in full (see send)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._rbuf = bytearray()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        # whoever holds the token reads the socket: a thread waiting in get() for a
        # result of this channel (one wakeup: its own), else the channel's reader
        self.token = threading.Lock()
        self._rcond = threading.Condition(threading.Lock())
        self._parked = False           # the reader sleeps until a call goes out
        threading.Thread(target=self._reader, name="strato-direct", daemon=True).start()

    def send(self, spec: TaskSpec, fns: dict | None = None) -> bool:
        """Send one call (with the functions the worker lacks); False when the channel
        is gone (the caller uses the agent). An actor's calls after the first go as only
        what differs from call to call (a fifth of the bytes, and of the pickling)."""
        with self._lock:     # (the template changes in the order frames go out)
            if self.lost:
                return False
            t = self._template
            if t is not None and fns is None and spec.actor_options is t.actor_options \
                    and spec.job_id == t.job_id and not spec.attempt and not spec.deps \
                    and spec.runtime_env is None and spec.nested is None:
                data = encode([(m.DIRECT_ACTOR_CALL, spec.task_id, spec.method, spec.args,
                                spec.return_ids, spec.seq)])
            else:
                data = encode([(m.DIRECT_CALLS, [spec], fns)])
                if spec.kind == ACTOR_CALL:
                    self._template = spec     # (the worker keeps the same one)
            self.inflight[spec.task_id] = spec
            self._write(data)
        if self._parked:
            with self._rcond:
                self._rcond.notify()
        return True

    def cancel(self, task_id: bytes) -> bool:
        data = encode([(m.CANCEL_EXEC, task_id)])
        with self._lock:
            if self.lost or task_id not in self.inflight:
                return False
            self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        """Never blocks (under ``_lock``): the worker reads its socket only between the
        calls it runs, so what the socket does not take now waits in ``_backlog``, which
        a thread of its own sends in order."""
        if self._backlog is not None:
            self._backlog.append(data)
            return
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:       # gone: the reader sees it and hands the calls back
            return
        if sent < len(data):
            self._backlog = [data[sent:]]
            threading.Thread(target=self._send_backlog, name="strato-direct-out",
                             daemon=True).start()

    def _send_backlog(self) -> None:
        while True:
            with self._lock:
                parts = self._backlog
                if not parts:
                    self._backlog = None
                    return
                self._backlog = []
            try:
                self.sock.sendall(b"".join(parts))
            except OSError:
                with self._lock:
                    self._backlog = None
                return

    def pump(self, timeout: float | None) -> bool:
        """Read what arrives within ``timeout`` and hand it on (the caller holds
        ``token``). False: nothing came, or the channel is gone."""
        if self.lost:
            return False
        try:
            if not self._poll.poll(None if timeout is None else timeout * 1000):
                return False
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self._on_close()
            return False
        self._rbuf += data
        results: list = []
        for msg in take_frames(self._rbuf):
            if msg[0] == RESULT:
                results += msg[1]
        if results:
            self.core._direct_results(self, results)
        return True

    def _reader(self) -> None:
        """Reads when no waiting get() does: calls in flight that nobody waits for yet
        (their results must not fill the socket, which would hold up the worker) and
        the end of the worker (its calls go back to the agent). Checks every 10 ms
        while calls are in flight, sleeps while none is."""
        while not self.lost:
            with self._rcond:
                if not self.inflight:
                    self._parked = True
                    if not self.inflight:
                        self._rcond.wait()
                    self._parked = False
                    continue
                self._rcond.wait(0.01)   # (or sooner: a reading thread let go)
            while self.inflight and not self.lost and self.token.acquire(False):
                try:
                    busy = self.pump(0.01)
                finally:
                    self.token.release()
                if not busy:
                    break

    def _on_close(self) -> None:
        with self._lock:
            if self.lost:
                return
            self.lost = True
            specs = list(self.inflight.values())
            self.inflight.clear()
        with self._rcond:
            self._rcond.notify()
        self.core._direct_lost(self, specs)

    def abandon(self) -> None:
        """Close it as if the worker had gone: calls in flight go back to the agent."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._on_close()

    def close(self) -> None:
        with self._lock:
            self.lost = True
        with self._rcond:
            self._rcond.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class DirectCalling:
    """The ``CoreWorker`` state and methods of direct actor calls (see the module doc)."""

    def _init_direct(self) -> None:
        # actor id -> DirectChannel, or (_ASKED, when) / (_AT, path, pid) before it is one
        self.direct: dict[bytes, object] = {}
        # (re-entrant: a ref's __del__ may release inside a locked block, on this thread)
        self._direct_lock = threading.RLock()
        self.direct_pending: set[bytes] = set()     # return ids of direct calls in flight
        self.direct_unknown: set[bytes] = set()     # results the agent never heard of
        self.direct_adopted: set[bytes] = set()     # in flight, escaped: the agent waits
        self.agent_call_of: dict[bytes, bytes] = {}   # task id -> actor: calls via the agent
        self.agent_calls: dict[bytes, int] = {}       # actor -> such calls in flight
        self.worker_channels: dict[str, DirectChannel] = {}   # leased workers' (leases)
        self.pending_chan: dict[bytes, DirectChannel] = {}    # task id -> its channel

    # ------------------------------------------------------------------ sending
    def submit_actor_call(self, spec: TaskSpec, direct_ok: bool) -> None:
        """Send an actor call, straight to the actor's worker when that keeps its order."""
        if direct_ok and ENABLED and not self.remote:
            chan = self._channel(spec.actor_id)
            if chan is not None:
                pending = self.direct_pending
                with self._direct_lock:
                    pending.update(spec.return_ids)
                self.pending_chan[spec.task_id] = chan
                if chan.send(spec):
                    return
                self.pending_chan.pop(spec.task_id, None)
                with self._direct_lock:
                    pending.difference_update(spec.return_ids)
        with self._direct_lock:
            self._count_agent_call(spec)
        self.send((m.ACTOR_CALLS, [spec]))

    def _count_agent_call(self, spec: TaskSpec) -> None:
        actor = spec.actor_id
        self.agent_call_of[spec.task_id] = actor
        self.agent_calls[actor] = self.agent_calls.get(actor, 0) + 1

    def _channel(self, actor_id: bytes) -> DirectChannel | None:
        state = self.direct.get(actor_id)
        if type(state) is DirectChannel:
            if not state.lost and not self.agent_calls.get(actor_id):
                return state
            return None
        now = time.monotonic()
        if state is None or (state[0] == _ASKED and now - state[1] > ASK_AGAIN_S):
            self.direct[actor_id] = (_ASKED, now)
            self.send((m.ACTOR_WHERE, actor_id))
            return None
        if state[0] != _AT or self.agent_calls.get(actor_id):
            return None
        with self._direct_lock:
            if self.direct.get(actor_id) is not state:
                return None
            try:
                chan = DirectChannel(self, actor_id, state[1], state[2])
            except OSError:     # the process went away meanwhile: ask again later
                self.direct[actor_id] = (_ASKED, now)
                return None
            self.direct[actor_id] = chan
        return chan

    def _agent_call_done(self, returns: list) -> None:
        """Calls routed through the agent finished (their results came)."""
        with self._direct_lock:
            for ret in returns:
                actor = self.agent_call_of.pop(ret.oid, None)
                if actor is not None:
                    n = self.agent_calls.get(actor, 0) - 1
                    if n > 0:
                        self.agent_calls[actor] = n
                    else:
                        self.agent_calls.pop(actor, None)

    def _on_actor_here(self, msg) -> None:
        _, actor_id, path, pid = msg
        if path:
            self.direct[actor_id] = (_AT, path, pid)

    def forget_direct(self, actor_id: bytes) -> None:
        """kill(): calls made from now on go through the agent, which fails them at once
        (calls in flight end with the process, DIRECT_LOST)."""
        self.direct[actor_id] = (_ASKED, time.monotonic())

    def cancel_direct(self, task_id: bytes, force: bool) -> bool:
        """Cancel a call in flight on a direct channel (False: it is not on one). A task
        on a leased worker is cancelled through the agent, whose connection to the worker
        is read while it runs (force: the agent kills it; the task then fails with
        TaskCancelledError, not retried); a queued actor call on the channel itself."""
        if task_id not in self.direct_pending:
            return False
        for chan in [*self.direct.values(), *self.worker_channels.values()]:
            if type(chan) is not DirectChannel or task_id not in chan.inflight:
                continue
            if chan.actor_id is None:
                self.send((m.CANCEL, task_id, force, chan.pid))
                return True
            if chan.cancel(task_id):
                return True
        return False

    def close_direct(self) -> None:
        for chan in [*self.direct.values(), *self.worker_channels.values()]:
            if type(chan) is DirectChannel:
                chan.close()
        self.direct.clear()
        self.worker_channels.clear()

    # ------------------------------------------------------------------ receiving
    def _direct_results(self, chan: DirectChannel, returns: list) -> None:
        """Results from the actor's worker (on the channel's reader thread)."""
        values, owned = self.values, self.owned
        pending, unknown, adopted = self.direct_pending, self.direct_unknown, self.direct_adopted
        with self._direct_lock:
            pending_chan = self.pending_chan
            for ret in returns:
                oid = ret.oid
                chan.inflight.pop(oid, None)     # (the first return id is the task id)
                pending_chan.pop(oid, None)
                pending.discard(oid)
                # in the store or holding refs: the worker registered it with the agent
                registered = ret.inline is None or ret.contained is not None
                if ret.error:
                    info = (ERROR, ret.inline)
                elif ret.inline is not None:
                    info = (INLINE, ret.inline)
                else:
                    info = (AT_NODE, ret.node, ret.size)
                if oid in adopted:     # (even if dropped since: others may wait for it)
                    adopted.discard(oid)
                    if not registered:
                        self._add_op((m.REF_ADOPTED_READY, oid, info))
                elif not registered and oid in owned:
                    unknown.add(oid)
                if oid in owned:
                    values[oid] = info
                    if info[0] == AT_NODE and ret.node != self.local_node:
                        self.far.add(oid)
        if chan.actor_id is None:
            self.lease_done(chan, returns)
        with self.cond:
            self.cond.notify_all()

    def _direct_lost(self, chan: DirectChannel, specs: list) -> None:
        """The worker process went away: what was in flight goes to the agent, which
        retries it (on the restarted actor) or fails it, and later calls take that road
        until the caller asks again (or is leased another worker)."""
        if chan.actor_id is None:
            self.lease_lost(chan)
        elif self.direct.get(chan.actor_id) is chan:
            self.direct[chan.actor_id] = (_ASKED, time.monotonic())
        if self.closed or not specs:
            return
        with self._direct_lock:
            for spec in specs:
                self.direct_pending.difference_update(spec.return_ids)
                self.direct_adopted.difference_update(spec.return_ids)
                self.pending_chan.pop(spec.task_id, None)
                if spec.actor_id is not None:
                    self._count_agent_call(spec)
        # (a leased worker is named by its id: its pid may be another process's by now)
        self.send((m.DIRECT_LOST, chan.actor_id,
                   chan.pid if chan.actor_id is not None else chan.worker_id, specs))

    def channel_to_read(self, waiting) -> DirectChannel | None:
        """When every ref in ``waiting`` (not ready) is a direct call's: a channel one
        is pending on whose token this thread got (it then reads that channel itself).
        None: some result comes another way (the agent's reader wakes this thread), or
        another thread reads."""
        pending = self.pending_chan
        chans = [pending.get(ref.id) for ref in waiting]
        if None in chans:
            return None
        for chan in chans:
            if not chan.lost and chan.token.acquire(False):
                return chan
        return None

    def release_channel(self, chan: DirectChannel) -> None:
        """Done reading ``chan`` here: if calls are still in flight on it (another thread
        may wait for them), its reader takes over now, not at its next check."""
        chan.token.release()
        if chan.inflight:
            with chan._rcond:
                chan._rcond.notify()

    def read_direct(self, oid: bytes, timeout: float | None) -> bool:
        """``get`` of one direct call's result: read its channel on this thread (one
        wakeup, this thread's, instead of the reader's and then this one's). False:
        another thread reads it, or it is gone: wait the general way."""
        chan = self.pending_chan.get(oid)
        if chan is None or not chan.token.acquire(False):
            return False
        values = self.values
        blocked = False
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while oid not in values and not chan.lost and not self.closed:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                if not blocked and self.on_block is not None:
                    blocked = True
                    self.on_block(True)
                chan.pump(wait)
        finally:
            self.release_channel(chan)
            if blocked:
                self.on_block(False)
        return oid in values

    # ------------------------------------------------------------------ escaping
    def adopt(self, oid: bytes) -> None:
        """A direct call's result (``oid``, owned) may now be read by others: the agent
        keeps it from here (ahead of the message it escapes in)."""
        with self._direct_lock:
            if oid in self.direct_unknown:
                self.direct_unknown.discard(oid)
                self._add_op((m.REF_ADOPT, oid, self.values.get(oid)))
            elif oid in self.direct_pending and oid not in self.direct_adopted:
                self.direct_adopted.add(oid)
                self._add_op((m.REF_ADOPT, oid, None))

    def direct_release(self, oid: bytes) -> bool:
        """The last ref of an owned object went: True when it was a direct call's result,
        now forgotten here (and at the agent, which may have it or get it later)."""
        with self._direct_lock:
            if oid in self.direct_unknown:        # the agent never heard of it
                self.direct_unknown.discard(oid)
            elif oid in self.direct_pending:      # not answered yet: the agent frees it
                self.direct_pending.discard(oid)  # if it gets it (adopted, registered)
                self._add_op(oid)
            else:
                return False
            self.owned.discard(oid)
            self.escaped.discard(oid)
            self.forget_value(oid)
        return True
