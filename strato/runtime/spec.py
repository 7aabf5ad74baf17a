"""The records that travel between processes: task specs and object descriptors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASK = 0
ACTOR_CREATE = 1
ACTOR_CALL = 2

INLINE_MAX = 100 * 1024  # values up to this size travel inside messages


@dataclass(slots=True)
class TaskSpec:
    """Everything needed to run one task, actor creation or actor call, anywhere."""

    task_id: bytes
    kind: int
    job_id: bytes
    owner_node: bytes           # node whose agent owns the return objects
    owner_client: bytes         # client (driver/worker) that submitted it
    function_id: bytes          # content hash of the pickled function or class
    name: str                   # for errors and logs
    args: bytes                 # serialized (args, kwargs) with top-level refs as placeholders
    deps: list                  # [(oid, owner_node)] top-level ref args to resolve
    return_ids: list            # [oid]
    resources: dict = field(default_factory=dict)
    max_retries: int = 0
    retry_exceptions: Any = False
    actor_id: bytes | None = None
    method: str | None = None
    actor_options: dict | None = None   # creation: max_concurrency, is_async, max_restarts...
    attempt: int = 0
    seq: int = 0                # per-caller sequence for actor calls
    dep_values: dict | None = None  # oid -> ("inline", bytes) | ("node", node_id) once resolved
    runtime_env: dict | None = None
    nested: list | None = None  # [(oid, owner_node)] refs nested in the args (lineage holds)

    def shape_key(self) -> tuple:
        return tuple(sorted(self.resources.items()))

    def __reduce__(self):
        # the fields as a plain tuple, as ReturnValue does (the slots dataclass default
        # goes through __getstate__/__setstate__: unpickling took twice the time and the
        # pickle 1.7x the bytes, on every hop of every task and actor call)
        return (TaskSpec, (self.task_id, self.kind, self.job_id, self.owner_node,
                           self.owner_client, self.function_id, self.name, self.args,
                           self.deps, self.return_ids, self.resources, self.max_retries,
                           self.retry_exceptions, self.actor_id, self.method,
                           self.actor_options, self.attempt, self.seq, self.dep_values,
                           self.runtime_env, self.nested))


@dataclass(slots=True)
class ReturnValue:
    """One result: inline bytes, or the node holding it in its store."""

    oid: bytes
    inline: bytes | None
    node: bytes | None
    size: int
    error: bool = False
    contained: list | None = None   # [(oid, owner_node)] refs inside the value

    def __reduce__(self):
        # the fields as a plain tuple (the dataclass default goes through Python-level
        # __getstate__/__setstate__: twice the time, on every hop of every result)
        if self.contained is None:
            return (ReturnValue, (self.oid, self.inline, self.node, self.size, self.error))
        return (ReturnValue, (self.oid, self.inline, self.node, self.size, self.error,
                              self.contained))


class ArgRef:
    """Placeholder for a top-level ref argument, replaced by its value before the call."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (ArgRef, (self.index,))
