"""What the head agent keeps for clients beyond a session: durable calls, working dirs.

Owns: ``durable`` (call id -> ``DurableCall``: a spawned call and its result, owned by
this agent rather than by the client that made it, kept for its retention time) and
``working_dirs`` (content hash -> object id of the packed directory). A durable call's
task, results and arguments belong to ``HEAD_OWNED``, so no session's end frees them;
``FunctionCall.from_id`` finds the call with the ``durable_call`` RPC.

On the head, durable calls also outlive the head process (``durable_store``, the head's
SQLite tables): a spawn saves its spec, function and argument values, a finished call
its result (values as files under ``<temp_dir>/durable``), and a head that restarts on
the same temp dir loads them back: finished calls answer ``from_id`` with their result,
unfinished ones run again (at least once, as Ray retries a task whose node died). An
argument that was itself still being computed at spawn time is not saved; such a call
fails after a restart with ``ObjectLostError`` naming it.

Working dirs are synced file by file, content-addressed (``wd_missing``, ``wd_file``,
``wd_commit``): the head unpacks each package once under ``<temp_dir>/working_dirs`` and
keeps a zip of it as an object, which workers on other nodes fetch by id and unpack
into their own node's cache.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import time
import zipfile
from dataclasses import dataclass

from strato.exceptions import DurableCallNotFoundError, ObjectLostError
from strato.localfiles import atomic_write
from strato.runtime.agent.objects import ObjEntry, ObjState, error_bytes
from strato.runtime.serialization import serialize
from strato.runtime.spec import INLINE_MAX, ReturnValue, TaskSpec
from strato.runtime.store import write_object
from strato.runtime.workdir import unpack_working_dir, working_dir_root

HEAD_OWNED = b"strato-head-own\x00"   # owner client id of what outlives sessions
DEFAULT_RETENTION_S = 24 * 3600.0
log = logging.getLogger("strato.agent")


@dataclass
class DurableCall:
    spec: TaskSpec
    deps: list                  # argument objects it took over from the session
    created: float
    retention: float
    done: bool = False           # its result is saved too (head restarts keep it)


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


class DurableCalls:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_durable(self) -> None:
        self.durable: dict[bytes, DurableCall] = {}
        self.working_dirs: dict[str, bytes] = {}
        self.durable_store = None    # the head's ``HeadStore``: calls outlive a restart

    # ------------------------------------------------------------------ durable calls
    def on_spawn(self, client, msg) -> None:
        _, spec, retention = msg
        spec.owner_client = HEAD_OWNED   # its job stays the session's: output goes there
        spec.owner_node = self.node_id
        taken = []
        for oid, _owner in spec.deps:
            entry = self.objects.get(oid)
            if entry is not None and entry.owner_client == client.client_id:
                entry.owner_client = HEAD_OWNED   # the session's end must not free it
                taken.append(oid)
        retention = float(retention or DEFAULT_RETENTION_S)
        call = DurableCall(spec, taken, time.time(), retention)
        self.durable[spec.task_id] = call
        self.loop.call_later(retention, self._expire_durable, spec.task_id)
        if self.durable_store is not None:
            self._save_spawn(call)
        for oid in spec.return_ids:
            self.objects[oid] = ObjEntry(HEAD_OWNED, spec)
        self.owned_tasks[spec.task_id] = (spec, None)
        self._resolve_then_place(spec)

    def _expire_durable(self, call_id: bytes) -> None:
        call = self.durable.get(call_id)
        if call is None:
            return
        if call_id in self.owned_tasks:   # still running: keep it as long again
            self.loop.call_later(call.retention, self._expire_durable, call_id)
            return
        del self.durable[call_id]
        for oid in [*call.spec.return_ids, *call.deps]:
            self._free_owned(oid)
        if self.durable_store is not None:
            self.durable_store.drop_durable(call_id)
            for oid in [call_id, *(o for o, _ in call.spec.deps)]:
                for suffix in (".result", ".arg"):
                    _unlink(self._durable_file(oid, suffix))

    # ------------------------------------------------------------------ kept on disk
    def _durable_file(self, oid: bytes, suffix: str) -> str:
        return os.path.join(self.temp_dir, "durable", oid.hex() + suffix)

    def _value_of(self, oid: bytes) -> tuple[str, bytes] | None:
        """An object this agent can read now, as (kind, bytes); None if it cannot."""
        entry = self.objects.get(oid)
        if entry is None or entry.state not in (ObjState.READY, ObjState.ERROR):
            return None
        if entry.state is ObjState.ERROR:
            return "error", entry.inline or b""
        if entry.inline is not None:
            return "inline", entry.inline
        mm = self.store.open(oid) if entry.node == self.node_id else None
        return None if mm is None else ("stored", bytes(mm))

    def _record(self, call: DurableCall, **extra) -> dict:
        spec = copy.copy(call.spec)
        spec.dep_values = None
        return {"spec": spec, "fn": self.fns.get(spec.function_id), "deps": call.deps,
                "created": call.created, "retention": call.retention, "done": call.done,
                **extra}

    def _save_spawn(self, call: DurableCall) -> None:
        """Save the call and the values of its arguments this agent holds."""
        args = {}
        os.makedirs(os.path.join(self.temp_dir, "durable"), mode=0o700, exist_ok=True)
        for oid, _owner in call.spec.deps:
            value = self._value_of(oid)
            if value is not None:
                atomic_write(self._durable_file(oid, ".arg"), value[1], mode=0o600)
                args[oid] = value[0]
        self.durable_store.save_durable(call.spec.task_id, self._record(call, args=args))

    def _durable_finished(self, call_id: bytes) -> None:
        """A durable call's result arrived (``_set_ready``): save it, off the loop."""
        call = self.durable.get(call_id)
        if call is None or call.done or self.durable_store is None:
            return
        entry = self.objects[call_id]
        if entry.state is ObjState.READY and entry.inline is None \
                and entry.node != self.node_id:
            # the result lives on another node: bring a copy here, then save it
            self._pull(call_id, entry.node, entry.size,
                       lambda ok, err=None: ok and self._save_result(call, entry, True))
            return
        self._save_result(call, entry, False)

    def _save_result(self, call: DurableCall, entry: ObjEntry, pulled: bool) -> None:
        if entry.state is ObjState.ERROR:
            kind, data = "error", entry.inline or b""
        elif entry.inline is not None:
            kind, data = "inline", entry.inline
        else:
            kind, data = "stored", self.store.open(call.spec.task_id)
            if data is None:
                return
        path = self._durable_file(call.spec.task_id, ".result")
        store = self.durable_store

        def saved(fut) -> None:
            if fut.exception() is not None:
                log.warning("durable call %s: could not save its result: %s",
                            call.spec.task_id.hex()[:8], fut.exception())
                return
            if call.spec.task_id in self.durable:
                call.done = True
                store.save_durable(call.spec.task_id, self._record(call, result=kind))
        self.loop.run_in_executor(None, atomic_write, path, data, 0o600, False).add_done_callback(saved)

    def restore_durable(self) -> int:
        """Load the durable calls a previous head process saved; returns how many."""
        store = self.durable_store
        now = time.time()
        restored = 0
        for call_id, rec in store.durable_calls().items():
            spec = rec["spec"]
            deps = [o for o, _ in spec.deps]
            left = rec["created"] + rec["retention"] - now
            if left <= 0:
                store.drop_durable(call_id)
                for oid in [call_id, *deps]:
                    for suffix in (".result", ".arg"):
                        _unlink(self._durable_file(oid, suffix))
                continue
            spec.owner_node = self.node_id
            spec.owner_client = HEAD_OWNED
            if rec["fn"] is not None:
                self.fns[spec.function_id] = rec["fn"]
            call = DurableCall(spec, rec["deps"], rec["created"], rec["retention"])
            self.durable[call_id] = call
            self.loop.call_later(left, self._expire_durable, call_id)
            restored += 1
            if rec["done"] and self._load_value(call_id, rec["result"], ".result", spec):
                call.done = True
                continue
            missing = [o for o in deps if o not in rec.get("args", {})
                       or not self._load_value(o, rec["args"][o], ".arg", None)]
            for oid in spec.return_ids:
                self.objects[oid] = ObjEntry(HEAD_OWNED, spec)
            if missing:
                err = error_bytes(ObjectLostError(
                    f"durable call {spec.name} ({call_id.hex()}): its argument "
                    f"{missing[0].hex()} was still being computed when the call was made, "
                    "so the head could not keep it across its restart"))
                for oid in spec.return_ids:
                    self._set_ready(oid, ReturnValue(oid, err, None, len(err), True))
                continue
            spec.deps = [(o, self.node_id) for o in deps]
            spec.dep_values = None
            self.owned_tasks[spec.task_id] = (spec, None)
            self._resolve_then_place(spec)
        if restored:
            log.info("restored %d durable call(s) from the head's disk", restored)
        return restored

    def _load_value(self, oid: bytes, kind: str, suffix: str, lineage) -> bool:
        """Put a saved value back as a head-owned object; False if its file is gone."""
        try:
            with open(self._durable_file(oid, suffix), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False
        entry = ObjEntry(HEAD_OWNED, lineage)
        entry.size = len(data)
        entry.state = ObjState.ERROR if kind == "error" else ObjState.READY
        if kind == "stored":
            fd, tmp = self.store.new_file(oid, len(data))
            try:
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)
            if not self.store.finish_file(oid, tmp, len(data)):
                return False
            entry.node = self.node_id
        else:
            entry.inline = data
        self.objects[oid] = entry
        return True

    def _rpc_durable_call(self, call_id: bytes) -> dict:
        call = self.durable.get(call_id)
        if call is None:
            raise DurableCallNotFoundError(
                f"no durable call {call_id.hex()} on this cluster's head: it never existed "
                "here, or its result was kept past its retention and dropped")
        entry = self.objects.get(call.spec.task_id)
        return {"call_id": call_id, "name": call.spec.name, "node": self.node_id,
                "return_ids": list(call.spec.return_ids), "created": call.created,
                "retention_s": call.retention,
                "done": entry is not None and entry.state is not ObjState.PENDING}

    def durable_activity(self) -> dict:
        running = sum(1 for cid in self.durable if cid in self.owned_tasks)
        return {"durable_running": running, "durable_kept": len(self.durable) - running}

    # ------------------------------------------------------------------ working dirs
    def _wd_root(self) -> str:
        return working_dir_root(self.temp_dir)

    def _rpc_wd_missing(self, digests: list) -> list:
        """Which of these file contents (sha256 hex) the head does not have yet."""
        files = os.path.join(self._wd_root(), "files")
        return [d for d in digests if not os.path.exists(os.path.join(files, d))]

    def _rpc_wd_file(self, digest: str, offset: int, data: bytes, total: int) -> bool:
        """One piece of a file's content; the last piece checks the digest."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError("wd_file: not a sha256 hex digest")
        files = os.path.join(self._wd_root(), "files")
        os.makedirs(files, exist_ok=True)
        part = os.path.join(files, digest + ".part")
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)
        if offset + len(data) < total:
            return False
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            os.unlink(part)
            raise ValueError(f"wd_file: content of {digest[:12]} does not match its digest")
        os.rename(part, os.path.join(files, digest))
        return True

    def _rpc_wd_commit(self, pkg: str, manifest: dict) -> tuple:
        """Assemble a package from synced files (once per content hash); returns what
        a task's ``runtime_env`` names: (package hash, object id, this node)."""
        oid = bytes.fromhex(pkg)[:16]
        if pkg in self.working_dirs:
            return pkg, oid, self.node_id
        root = self._wd_root()
        final = os.path.join(root, pkg)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for rel, (digest, mode) in sorted(manifest.items()):
                if not _safe_relpath(rel):
                    raise ValueError(f"wd_commit: unsafe path {rel!r}")
                src = os.path.join(root, "files", digest)
                info = zipfile.ZipInfo(rel)
                info.external_attr = (mode & 0o777) << 16
                with open(src, "rb") as f:
                    zf.writestr(info, f.read())
        zipped = buf.getvalue()
        unpack_working_dir(root, pkg, zipped)
        assert os.path.isdir(final)
        sv = serialize(zipped)
        entry = ObjEntry(HEAD_OWNED)
        entry.state = ObjState.READY
        if sv.total_size <= INLINE_MAX:
            entry.inline = sv.to_bytes()
            entry.size = len(entry.inline)
        else:
            entry.size = write_object(self.store.shm_dir, oid, sv)
            entry.node = self.node_id
            self.store.sealed(oid, entry.size)
        self.objects[oid] = entry
        self.working_dirs[pkg] = oid
        return pkg, oid, self.node_id


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
