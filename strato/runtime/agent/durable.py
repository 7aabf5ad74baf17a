"""What the head agent keeps for clients beyond a session: durable calls, working dirs.

Owns: ``durable`` (call id -> ``DurableCall``: a spawned call and its result, owned by
this agent rather than by the client that made it, kept for its retention time) and
``working_dirs`` (content hash -> object id of the packed directory). A durable call's
task, results and arguments belong to ``HEAD_OWNED``, so no session's end frees them;
``FunctionCall.from_id`` finds the call with the ``durable_call`` RPC.

Working dirs are synced file by file, content-addressed (``wd_missing``, ``wd_file``,
``wd_commit``): the head unpacks each package once under ``<temp_dir>/working_dirs`` and
keeps a zip of it as an object, which workers on other nodes fetch by id and unpack
into their own node's cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from dataclasses import dataclass

from strato.exceptions import DurableCallNotFoundError
from strato.runtime.agent.objects import ObjEntry, ObjState
from strato.runtime.serialization import serialize
from strato.runtime.spec import INLINE_MAX, TaskSpec
from strato.runtime.store import write_object
from strato.runtime.workdir import unpack_working_dir, working_dir_root

HEAD_OWNED = b"strato-head-own\x00"   # owner client id of what outlives sessions
DEFAULT_RETENTION_S = 24 * 3600.0


@dataclass
class DurableCall:
    spec: TaskSpec
    deps: list                  # argument objects it took over from the session
    created: float
    retention: float


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


class DurableCalls:
    """Mixin of ``NodeAgent``: see the module docstring."""

    def _init_durable(self) -> None:
        self.durable: dict[bytes, DurableCall] = {}
        self.working_dirs: dict[str, bytes] = {}

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
        self.durable[spec.task_id] = DurableCall(spec, taken, time.time(), retention)
        self.loop.call_later(retention, self._expire_durable, spec.task_id)
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
