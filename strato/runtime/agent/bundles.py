"""The agent's placement-group bundles: reservations the head made on this node.

Owns: ``bundles`` (pg id -> [(index, shape)] reserved here). A reservation moves the
bundle's shape out of ``available`` and adds the bundle's own resources
(``placement.bundle_resources``) to ``total`` and ``available``; tasks and actors in the
group ask for those, so the rest of the agent schedules them like any other shape.
"""

from __future__ import annotations

from strato.exceptions import TaskCancelledError
from strato.runtime import messages as m
from strato.runtime import placement, scheduler
from strato.runtime.bounded import BoundedSet
from strato.runtime.spec import TASK


class BundleHost:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_bundles(self) -> None:
        self.bundles: dict[bytes, list] = {}
        self.removed_groups = BoundedSet(maxlen=10_000)   # pg ids, hex

    def on_pg_removed(self, _head, msg) -> None:
        """The group was removed (not rescheduled): its tasks fail now, queued here,
        waiting for it, or running (their workers are stopped), as Ray kills what uses a
        removed group's resources. The head kills its actors."""
        pg_hex = msg[1].hex()
        self.removed_groups.add(pg_hex)
        doomed = [s for q in self.ready.values() for s in q if self.in_removed_group(s)]
        doomed += [s for s in self.waiting if self.in_removed_group(s)]
        doomed += [s for w in self.workers.values() for s in w.inflight.values()
                   if s.kind == TASK and self.in_removed_group(s)]
        for spec in doomed:
            self._cancel(spec.task_id, force=True)

    def in_removed_group(self, spec) -> bool:
        return bool(self.removed_groups) and any(
            placement.is_group_resource(k) and k.rsplit("_", 1)[-1] in self.removed_groups
            for k in spec.resources)

    def fail_removed_group_task(self, spec) -> None:
        self._complete_with_error(spec, TaskCancelledError(
            f"task {spec.name} cancelled: its placement group was removed"))

    def on_reserve_bundles(self, _head, msg) -> None:
        _, pg_id, bundles = msg
        pg_hex = pg_id.hex()
        need: dict = {}
        for _index, shape in bundles:
            for name, amount in shape.items():
                need[name] = need.get(name, 0.0) + amount
        if not scheduler.fits(need, self.available):
            # the head reserved from a view a heartbeat old and work took the room
            # meanwhile: refuse rather than run both (the head tries again later)
            self.head.send((m.RESERVE_REFUSED, pg_id, self.node_id))
            return
        for index, shape in bundles:
            scheduler.acquire(self.available, shape)
            for name, amount in placement.bundle_resources(pg_hex, index, shape).items():
                if name in self.total:
                    self.total[name] += amount
                    self.available[name] = self.available.get(name, 0.0) + amount
                else:   # a stale count left by work of an earlier reservation goes
                    self.total[name] = amount
                    self.available[name] = amount
        self.bundles.setdefault(pg_id, []).extend(bundles)
        self._retry_waiting()
        self._schedule_dispatch()

    def on_release_bundles(self, _head, msg) -> None:
        pg_id = msg[1]
        for _index, shape in self.bundles.pop(pg_id, []):
            scheduler.release(self.available, shape)
        tail = "_" + pg_id.hex()
        for name in [k for k in self.total if placement.is_group_resource(k)
                     and k.endswith(tail)]:
            del self.total[name]
            self.available.pop(name, None)
        self._schedule_dispatch()

    def live_part(self, shape: dict) -> dict:
        """``shape`` without bundle resources this node no longer has (their group was
        released or rescheduled): what giving ``shape`` back may return."""
        if not placement.is_group_shape(shape):
            return shape
        return {k: v for k, v in shape.items()
                if not placement.is_group_resource(k) or k in self.total}
