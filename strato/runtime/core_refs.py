"""Reference counting, the client's half (the agent's is ``agent.refs``); a mixin of
``CoreWorker``.

``refcounts`` counts this process's live ObjectRefs per object. Of an object it owns, the last ref
dropped tells the agent (a bare oid in REFS). A ref it does not own is a borrow, but
registering every ref rebuilt from a value would cost one message per ref: a ref rebuilt
from a value is first only *covered* by it (``covers``): the value's own ref (or the
running task, for arguments) keeps it alive at its owner. Only when the cover goes (the
value's last ref dropped, the task done) are the refs of it still alive registered as
borrows (REF_BORROWED), ahead of the message that drops the cover. Refs this process
serializes into a put or a result are declared with it (the put's contained refs,
REF_CONTAINS); those nested in task arguments stay pinned until the task is done.
All ops go to the agent in program order, ahead of the next message (``_take_ops``).
"""

from __future__ import annotations

import os
import time

from strato.runtime import messages as m
from strato.runtime.messages import AT_NODE

FLUSH_DELAY_S = 0.05     # ops wait at most this long for a message to ride with


class RefCounting:
    """``refcounts``, ``owned``, ``borrowed``, ``covers``, ``escaped`` and the ops queue
    of a ``CoreWorker`` (which creates them), and what changes them."""

    ref_class: type   # ObjectRef (set by core, which defines it)

    def release(self, oid: bytes) -> None:
        """The last local ref is gone: forget the value; tell the agent (the owner
        frees the object once nobody anywhere holds it)."""
        if (self.direct_pending or self.direct_unknown) and self.direct_release(oid):
            return                    # a direct actor call's result (runtime.direct)
        value = self.values.pop(oid, None)
        if value is not None and value[0] == AT_NODE:
            self.far.discard(oid)
        if value is not None and self.covers:
            cover = self.covers.pop(oid, None)   # (the refs its value holds)
            if cover:
                self._uncover(cover)
        if oid in self.owned:
            self.owned.discard(oid)
            size = self.recyclable.pop(oid, None)
            escaped = oid in self.escaped
            if escaped:
                self.escaped.discard(oid)
            if size is not None:
                self.pool.add(oid, size)
            elif not escaped and value is not None and value[0] == AT_NODE \
                    and value[1] == self.local_node:
                # nobody else holds a ref: give the memory back now rather than when the
                # agent gets to the free (it may lag behind a tight loop); mappings that
                # exist stay valid, and the agent's delete then only fixes its accounting
                try:
                    os.unlink(os.path.join(self.store_paths[0], oid.hex()))
                except OSError:
                    pass
            ops = self._ops           # (_add_op, inlined: this is every object's end)
            ops.append(oid)
            if not self._flush_armed:
                self._flush_armed = True
                self._flush_wanted.set()
            if len(ops) >= 1000:
                self.conn.try_flush(block=False)
        elif self.borrowed and self.borrowed.pop(oid, None) is not None:
            self._add_op((m.REF_UNBORROWED, oid))

    def forget_value(self, oid: bytes) -> None:
        """Forget what this process knew of a value (``release`` does this inline: it
        runs at every object's end)."""
        self.values.pop(oid, None)
        self.far.discard(oid)

    def mark_escaped(self, refs) -> None:
        """These refs were serialized into a value another process may read: never
        unlink or recycle their objects from here (the agent frees them)."""
        owned = self.owned
        direct = self.direct_pending or self.direct_unknown
        for ref in refs:
            if ref.id in owned:
                self.escaped.add(ref.id)
                self.recyclable.pop(ref.id, None)
                if direct:
                    self.adopt(ref.id)

    def keep_forever(self, refs) -> None:
        """Hold these refs as long as this process lives (their objects then live until
        their owner exits): for refs that left in a way the runtime cannot follow."""
        self.mark_escaped(refs)
        self._forever.extend(refs)

    # ------------------------------------------------------------------ borrows
    def borrow(self, oid: bytes, owner_node: bytes) -> None:
        """This process holds a ref it does not own: register it now."""
        if oid not in self.owned and oid not in self.borrowed:
            self.borrowed[oid] = owner_node
            self._add_op((m.REF_BORROWED, oid, owner_node))

    def _rebuilder(self, key):
        """The function deserialize() rebuilds refs with (for a value that holds refs):
        they are covered by ``key``, the value's own oid (bytes) or a task's key
        (tuple). A value never changes: the refs in it are noted the first time it is
        read; reading it again (while its ref is held) notes nothing."""
        cover = self.covers.get(key)
        counts = self.refcounts
        if cover is not None and None in cover and type(key) is bytes:   # complete
            def rebuild(oid, owner_node, _new=object.__new__, _cls=self.ref_class):
                ref = _new(_cls)
                ref.id = oid
                ref.owner_node = owner_node
                counts[oid] = counts.get(oid, 0) + 1
                return ref
            return rebuild
        if cover is None:
            cover = self.covers[key] = {}

        def rebuild_noting(oid, owner_node, _new=object.__new__, _cls=self.ref_class):
            ref = _new(_cls)
            ref.id = oid
            ref.owner_node = owner_node
            counts[oid] = counts.get(oid, 0) + 1
            cover[oid] = owner_node
            return ref
        return rebuild_noting

    def uncover(self, key) -> None:
        """The cover ``key`` goes (a task is done): refs it covered that are still held
        become registered borrows, ahead of whatever the caller sends next."""
        cover = self.covers.pop(key, None)
        if cover:
            self._uncover(cover)

    def _uncover(self, cover: dict) -> None:
        counts, owned, borrowed = self.refcounts, self.owned, self.borrowed
        for oid, owner_node in list(cover.items()):   # (the None key is never in counts)
            if oid in counts and oid not in owned and oid not in borrowed:
                borrowed[oid] = owner_node
                self._add_op((m.REF_BORROWED, oid, owner_node))

    # ------------------------------------------------------------------ ops out
    def add_op(self, op) -> None:
        self._add_op(op)

    def _add_op(self, op) -> None:
        ops = self._ops
        ops.append(op)
        if not self._flush_armed:
            self._flush_armed = True
            self._flush_wanted.set()
        if len(ops) >= 1000:
            # not blocking: this may run inside a send (a ref freed by the garbage
            # collector), and a send under way takes these ops anyway
            self.conn.try_flush(block=False)

    def _take_ops(self):
        """The pending ops as one REFS message (None: none); called under the send lock."""
        ops = self._ops
        n = len(ops)
        if not n:
            return None
        batch = ops[:n]
        del ops[:n]
        return (m.REFS, batch)

    def _flusher(self) -> None:
        """Ops that no message took along within FLUSH_DELAY_S go on their own."""
        while not self.closed:
            self._flush_wanted.wait()
            time.sleep(FLUSH_DELAY_S)
            self._flush_armed = False
            self._flush_wanted.clear()
            if self._ops and not self.closed:
                self.conn.try_flush()
            if self._ops:
                self._flush_armed = True
                self._flush_wanted.set()

    def flush_frees(self) -> None:
        """Send pending reference-counting ops now."""
        if self._ops:
            self.conn.try_flush()
