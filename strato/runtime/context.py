"""What the running code can ask about itself: job, node, task, actor, GPU ids."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

_task: contextvars.ContextVar = contextvars.ContextVar("strato_task", default=None)
_state = {"core": None, "actor_id": None, "namespace": ""}


def set_namespace(namespace: str) -> None:
    """The driver's namespace (``init(namespace=...)``): named actors are found in it."""
    _state["namespace"] = namespace


def namespace() -> str:
    return _state["namespace"]


def set_worker(core) -> None:
    _state["core"] = core


def set_actor(actor_id: bytes) -> None:
    _state["actor_id"] = actor_id


def enter(spec, gpu_ids):
    return _task.set((spec, list(gpu_ids or [])))


def leave(token) -> None:
    _task.reset(token)


def current_gpu_ids() -> list:
    cur = _task.get()
    return cur[1] if cur else []


@dataclass
class RuntimeContext:
    """Ray's get_runtime_context(): ids of the job, node, task and actor running now."""

    job_id: str
    node_id: str
    task_id: str | None
    actor_id: str | None
    namespace: str
    worker_id: str

    def get_job_id(self) -> str:
        return self.job_id

    def get_node_id(self) -> str:
        return self.node_id

    def get_task_id(self) -> str | None:
        return self.task_id

    def get_actor_id(self) -> str | None:
        return self.actor_id

    def get_worker_id(self) -> str:
        return self.worker_id

    def get_assigned_resources(self) -> dict:
        cur = _task.get()
        return dict(cur[0].resources) if cur else {}

    @property
    def was_current_actor_reconstructed(self) -> bool:
        cur = _task.get()
        return bool(cur and cur[0].attempt > 0 and cur[0].actor_id is not None)


def runtime_context(core, namespace: str) -> RuntimeContext:
    cur = _task.get()
    spec = cur[0] if cur else None
    actor = _state["actor_id"]
    job = spec.job_id if spec else getattr(core, "job_id", b"")
    return RuntimeContext(job_id=job.hex(), node_id=core.node_id.hex(),
                          task_id=spec.task_id.hex() if spec else None,
                          actor_id=actor.hex() if actor else None, namespace=namespace,
                          worker_id=core.client_id.hex())
