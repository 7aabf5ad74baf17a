"""strato: Ray-compatible tasks and actors on clusters you own.

``import strato as ray`` runs a Ray user's code for the common Core API.
"""

from strato import checkpoint, exceptions
from strato.client import init
from strato.runtime.api import (
    ActorClass,
    ActorHandle,
    RemoteFunction,
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    get_runtime_context,
    is_initialized,
    kill,
    method,
    nodes,
    put,
    remote,
    shutdown,
    wait,
)
from strato.runtime.calls import FunctionCall
from strato.runtime.core import ObjectRef

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorHandle", "FunctionCall", "ObjectRef", "RemoteFunction", "available_resources", "checkpoint",
    "cancel", "cluster_resources", "exceptions", "get", "get_actor", "get_gpu_ids",
    "get_runtime_context", "init", "is_initialized", "kill", "method", "nodes", "put",
    "remote", "shutdown", "wait",
]
