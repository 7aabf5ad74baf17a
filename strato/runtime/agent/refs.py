"""The agent's distributed reference counting: when an object may be freed.

An object is owned by one agent (``ObjEntry`` in ``objects``) for one of its clients. It
lives while any of these holds it:

- its owning client (``entry.owner_holds``; the client says when its last ref goes),
- a borrower (``entry.rc.borrowers``): a local client, by client id, or another node, by
  node id, that holds refs to it,
- a live object whose value contains it (``entry.rc.contained_in``: container oid ->
  [count, container's owner node]); the container's owner says when it is freed.
(``entry.rc``, a ``RefState``, exists only for objects that ever needed more than the
first: most never do.)

Owns: ``borrowed`` (objects owned elsewhere that local clients hold: oid -> [owner node,
{client ids}]; the owner knows this node as one borrower), ``client_borrows`` (client id
-> oids it borrows, dropped when it disconnects) and the ordered outbox of messages to
owners (``_ref_out``).

Ordering is what keeps this safe. A client sends its ops in program order (REFS, ahead
of anything it sends next), and every peer link is FIFO. Across nodes, a hold this node
registers with an owner (PEER_BORROW, PEER_CONTAIN) is acknowledged; until it is, what
could make another node drop a hold (this node's PEER_UNBORROW / PEER_UNCONTAIN, and
TASK_DONE, after which a caller unpins its arguments) waits in the outbox unless it goes
to the very node all unacknowledged holds went to. Holds are never reordered after a drop
to the same node.

Failure: a local client that disconnects drops its borrows (a worker also drops what it
owned; a driver's objects go with its job); a dead node (NODE_DEAD) drops its borrows and
the containers it owned, and objects borrowed from it are forgotten.
"""

from __future__ import annotations

import logging
from collections import deque

from strato.runtime import messages as m
from strato.runtime.agent.objects import unheld
from strato.runtime.transport import PeerLostError

log = logging.getLogger("strato.agent")

HOLD_RETRY_S = 1.0
HOLD_TIMEOUT_S = 30.0
HOLD_ATTEMPTS = 30      # a live owner that never answers: then give up (it is declared
                        # dead long before, normally, which ends the wait at once)

_DROP = False     # outbox item kinds: (node, kind, payload)
_HOLD = True
_MESSAGE = None   # a whole message (TASK_DONE)


class RefCounting:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_refs(self) -> None:
        self.borrowed: dict[bytes, list] = {}        # oid -> [owner node, {client ids}]
        self.client_borrows: dict[bytes, set] = {}   # client id -> {oid}
        self._ref_out: deque = deque()               # [node, kind, ops | message]
        self._unacked: dict[bytes, int] = {}         # node -> hold batches not acked yet
        self._ref_pump_scheduled = False
        self._freeing: list | None = None            # frees in progress (_free_owned)

    # ------------------------------------------------------------------ from clients
    def on_refs(self, client, msg) -> None:
        cid = client.client_id
        objects = self.objects
        free = self._free_owned
        for op in msg[1]:
            if type(op) is bytes:      # the owner client dropped its last ref
                e = objects.get(op)
                if e is None:
                    # a direct call's result not heard of (yet): see agent.direct
                    self.freed_unknown.add(op)
                    continue
                if e.owner_client != cid:
                    continue
                rc = e.rc
                if rc is None or (rc.borrowers is None and rc.contained_in is None):
                    free(op)           # the usual case: nobody else holds it
                else:
                    e.owner_holds = False
                continue
            kind = op[0]
            if kind == m.REF_BORROWED:
                self._borrow(cid, op[1], op[2])
            elif kind == m.REF_UNBORROWED:
                self._unborrow(cid, op[1])
            elif kind == m.REF_CONTAINS:
                self._contains(op[1], op[2], op[3])
            elif kind == m.REF_ADOPT:
                self.adopt(cid, op[1], op[2])
            elif kind == m.REF_ADOPTED_READY:
                self.adopted_ready(op[1], op[2])
            else:
                log.warning("ignored an unknown reference op %r", kind)

    def _borrow(self, cid: bytes, oid: bytes, owner: bytes) -> None:
        if owner == self.node_id:
            e = self.objects.get(oid)
            if e is None:
                return    # freed already (or never made): nothing left to keep
            rc = e.refstate()
            if rc.borrowers is None:
                rc.borrowers = {cid}
            else:
                rc.borrowers.add(cid)
        else:
            rec = self.borrowed.get(oid)
            if rec is None:
                if owner in self._dead_nodes:
                    return
                self.borrowed[oid] = [owner, {cid}]
                self._ref_op(owner, _HOLD, (m.PEER_BORROW, oid))
            else:
                rec[1].add(cid)
        mine = self.client_borrows.get(cid)
        if mine is None:
            self.client_borrows[cid] = {oid}
        else:
            mine.add(oid)

    def _unborrow(self, cid: bytes, oid: bytes) -> None:
        mine = self.client_borrows.get(cid)
        if mine is not None:
            mine.discard(oid)
        e = self.objects.get(oid)
        if e is not None:
            rc = e.rc
            b = rc.borrowers if rc is not None else None
            if b and cid in b:
                b.discard(cid)
                if not b:
                    rc.borrowers = None
                    self._maybe_free(oid, e)
            return
        rec = self.borrowed.get(oid)
        if rec is not None and cid in rec[1]:
            rec[1].discard(cid)
            if not rec[1]:
                del self.borrowed[oid]
                self._ref_op(rec[0], _DROP, (m.PEER_UNBORROW, oid))

    def _contains(self, container: bytes, container_owner: bytes, refs: list) -> None:
        """``container``'s value holds ``refs``: each lives at least as long as it."""
        for oid, owner in refs:
            if owner == self.node_id:
                self._add_contain(oid, container, container_owner, 1)
            elif owner not in self._dead_nodes:
                self._ref_op(owner, _HOLD, (m.PEER_CONTAIN, oid, container, container_owner))

    def _release_contained(self, container: bytes, refs: list) -> None:
        """``container`` is freed (or its value discarded): it holds ``refs`` no more."""
        for oid, owner in refs:
            if owner == self.node_id:
                self._add_contain(oid, container, None, -1)
            elif owner not in self._dead_nodes:
                self._ref_op(owner, _DROP, (m.PEER_UNCONTAIN, oid, container))

    def _client_refs_gone(self, cid: bytes, owned: bool) -> None:
        """A local client is gone: it holds nothing any more (``owned``: neither what it
        owned; a driver's objects go with its job instead, by force)."""
        for oid in self.client_borrows.pop(cid, ()):
            self._unborrow(cid, oid)
        if owned:
            for oid, e in list(self.objects.items()):
                if e.owner_client == cid and e.owner_holds:
                    e.owner_holds = False
                    self._maybe_free(oid, e)

    def _rpc_debug_refs(self, limit: int = 200) -> dict:
        """What keeps objects alive here (for failing tests): owned objects with their
        holders, objects borrowed from elsewhere, holds not acknowledged yet."""
        def ids(xs):
            return sorted(x.hex()[:16] for x in xs)
        owned = {}
        for oid, e in list(self.objects.items())[:limit]:
            rc = e.rc
            owned[oid.hex()] = {
                "state": e.state.value, "owner_holds": e.owner_holds,
                "owner_client": e.owner_client.hex()[:16],
                "borrowers": ids(rc.borrowers or ()) if rc else [],
                "contained_in": {c.hex(): n for c, (n, _o) in (rc.contained_in or {}).items()}
                if rc else {},
                "contains": len(rc.contains or ()) if rc else 0}
        borrowed = {oid.hex(): {"owner": rec[0].hex()[:16], "clients": ids(rec[1])}
                    for oid, rec in list(self.borrowed.items())[:limit]}
        return {"node": self.node_id.hex()[:16], "owned": owned, "borrowed": borrowed,
                "unacked": {n.hex()[:16]: c for n, c in self._unacked.items()},
                "outbox": len(self._ref_out)}

    # ------------------------------------------------------------------ from peers
    def on_ref_ops(self, src, msg) -> None:
        """Ops from another node about objects owned here (``src`` is the reply
        function when the sender wants an acknowledgement: holds)."""
        _, sender, ops = msg
        try:
            if sender not in self._dead_nodes:   # a dead node's late word changes nothing
                self._apply_peer_ops(sender, ops)
        finally:
            if callable(src):
                src(True)

    def _apply_peer_ops(self, sender: bytes, ops: list) -> None:
        objects = self.objects
        for op in ops:
            kind, oid = op[0], op[1]
            if kind == m.PEER_BORROW:
                e = objects.get(oid)
                if e is not None:
                    rc = e.refstate()
                    if rc.borrowers is None:
                        rc.borrowers = {sender}
                    else:
                        rc.borrowers.add(sender)
            elif kind == m.PEER_UNBORROW:
                e = objects.get(oid)
                rc = e.rc if e is not None else None
                if rc is not None and rc.borrowers and sender in rc.borrowers:
                    rc.borrowers.discard(sender)
                    if not rc.borrowers:
                        rc.borrowers = None
                        self._maybe_free(oid, e)
            elif kind == m.PEER_CONTAIN:
                self._add_contain(oid, op[2], op[3], 1)
            elif kind == m.PEER_UNCONTAIN:
                self._add_contain(oid, op[2], None, -1)

    def on_obj_copy(self, node: bytes, msg) -> None:
        """``node`` pulled a copy of an object owned here: freed with it (now, if the
        object is gone already)."""
        _, oid, holder = msg
        e = self.objects.get(oid)
        if e is None:
            self._delete_copy(oid, holder)
        elif holder != e.node:
            rc = e.refstate()
            if rc.copies is None:
                rc.copies = {holder}
            else:
                rc.copies.add(holder)

    # ------------------------------------------------------------------ owner side
    def _add_contain(self, oid: bytes, container: bytes, container_owner: bytes | None,
                     delta: int) -> None:
        """Count ``container`` holding ``oid`` up or down (a count, not a set: a retried
        task's results register again, and every registration is released once)."""
        e = self.objects.get(oid)
        if e is None:
            return
        rc = e.refstate()
        d = rc.contained_in
        if d is None:
            d = rc.contained_in = {}
        c = d.get(container)
        if c is None:
            c = d[container] = [0, container_owner]
        elif c[1] is None:
            c[1] = container_owner
        c[0] += delta
        if c[0] == 0:    # (below zero: a release came first; kept until it balances)
            del d[container]
            if not d:
                rc.contained_in = None
                self._maybe_free(oid, e)

    def _maybe_free(self, oid: bytes, e) -> None:
        if unheld(e):
            self._free_owned(oid)

    def _refs_lost_with(self, node: bytes) -> None:
        """``node`` died: its borrows and the containers it owned are gone; objects it
        owned are no longer borrowed from here; what waited on its acks goes on."""
        for oid, e in list(self.objects.items()):
            rc = e.rc
            if rc is None:
                continue
            changed = False
            if rc.borrowers and node in rc.borrowers:
                rc.borrowers.discard(node)
                changed = True
            if rc.contained_in:
                for container, (_n, owner) in list(rc.contained_in.items()):
                    if owner == node:
                        del rc.contained_in[container]
                        changed = True
            if rc.copies:
                rc.copies.discard(node)
            if changed:
                if not rc.borrowers:
                    rc.borrowers = None
                if not rc.contained_in:
                    rc.contained_in = None
                self._maybe_free(oid, e)
        for oid in [o for o, rec in self.borrowed.items() if rec[0] == node]:
            del self.borrowed[oid]
        self._unacked.pop(node, None)
        if self._ref_out:
            self._ref_out = deque(item for item in self._ref_out if item[0] != node)
        self._pump_refs()

    # ------------------------------------------------------------------ ordered sends
    def _ref_op(self, node: bytes, kind: bool, op: tuple) -> None:
        out = self._ref_out
        if out:
            last = out[-1]
            if last[0] == node and last[1] is kind:
                last[2].append(op)
                return
        out.append([node, kind, [op]])
        if not self._ref_pump_scheduled:
            self._ref_pump_scheduled = True
            self.loop.call_soon(self._pump_refs)

    def send_after_holds(self, node: bytes, msg) -> None:
        """Send ``msg`` to ``node`` once every hold registered before it is acknowledged
        (at once, the usual case, when none waits or all went to ``node`` itself)."""
        unacked = self._unacked
        if not self._ref_out and (not unacked or (len(unacked) == 1 and node in unacked)):
            self.peers.send(node, msg)
            return
        self._ref_out.append([node, _MESSAGE, msg])
        if not self._ref_pump_scheduled:
            self._ref_pump_scheduled = True
            self.loop.call_soon(self._pump_refs)

    def _pump_refs(self) -> None:
        self._ref_pump_scheduled = False
        out = self._ref_out
        unacked = self._unacked
        dead = self._dead_nodes
        while out:
            node, kind, payload = out[0]
            if node in dead:
                out.popleft()
                continue
            if kind is _HOLD:
                out.popleft()
                self._send_holds(node, payload, 0)
                continue
            if unacked and (len(unacked) > 1 or node not in unacked):
                return    # waits for acks (_hold_answered pumps again)
            out.popleft()
            if kind is _DROP:
                self.peers.send(node, (m.REF_OPS, self.node_id, payload))
            else:
                self.peers.send(node, payload)

    def _send_holds(self, node: bytes, ops: list, attempt: int) -> None:
        if attempt == 0:
            self._unacked[node] = self._unacked.get(node, 0) + 1
        peers = self.peers
        if node not in peers.links and node not in peers.addresses:
            # nowhere to send it (a node this one never heard of, or forgot): nothing
            # there to keep alive
            self._hold_done(node)
            return
        fut = peers.request(node, (m.REF_OPS, self.node_id, ops), timeout=HOLD_TIMEOUT_S)
        fut.add_done_callback(lambda f: self._hold_answered(node, ops, attempt, f))

    def _hold_answered(self, node: bytes, ops: list, attempt: int, fut) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        if failed and not self.closing and node not in self._dead_nodes \
                and node in self._unacked:
            if attempt + 1 < HOLD_ATTEMPTS:
                # the link broke with the node still alive: the ops may be lost. Sent
                # again: a borrow twice is one (a set); a container counted twice is a
                # leak at worst, never an early free
                if isinstance(fut.exception() if not fut.cancelled() else None, PeerLostError):
                    self.loop.call_later(HOLD_RETRY_S, self._resend_holds, node, ops,
                                         attempt + 1)
                    return
            log.warning("node %s never acknowledged %d reference holds; going on without",
                        node.hex()[:8], len(ops))
        self._hold_done(node)

    def _resend_holds(self, node: bytes, ops: list, attempt: int) -> None:
        if node in self._dead_nodes or node not in self._unacked:
            self._hold_done(node)
            return
        self._send_holds(node, ops, attempt)

    def _hold_done(self, node: bytes) -> None:
        n = self._unacked.get(node, 0) - 1
        if n > 0:
            self._unacked[node] = n
        else:
            self._unacked.pop(node, None)
        self._pump_refs()
