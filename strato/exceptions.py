"""strato's exception hierarchy: one base, errors that carry what a user needs to act."""

from __future__ import annotations


class StratoError(Exception):
    """Base class of every error strato raises on purpose."""


# ---------------------------------------------------------------- runtime
class RuntimeNotInitializedError(StratoError):
    """An API call that needs a cluster ran before ``strato.init()``."""


class AuthenticationError(StratoError):
    """A connection presented a wrong or missing cluster token."""


class HeadUnreachableError(StratoError, ConnectionError):
    """The head service cannot be asked: no runtime to attach to, or the connection to it
    was lost. Only this means "head down"; any other error from a head call is the call's
    own (a bad argument, a bug in the RPC) and propagates as itself."""


class VersionMismatchError(StratoError):
    """A serverless client and its cluster run different Python, cloudpickle or strato
    versions: found at connect, before any call; the message names both sides and the fix."""


class DurableCallNotFoundError(StratoError, KeyError):
    """``FunctionCall.from_id``: no durable call of that id on the head (never made, or
    its result's retention ran out)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskError(StratoError):
    """A remote task or actor method raised; carries the remote traceback.

    The instance raised by ``get`` is also an instance of the user's exception type,
    so ``except ValueError`` keeps working (as in Ray).
    """

    def __init__(self, function_name: str = "", traceback_str: str = "", cause=None):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        super().__init__(function_name, traceback_str, cause)

    def __str__(self) -> str:
        return f"{self.function_name} failed:\n{self.traceback_str}"

    def as_instanceof_cause(self) -> TaskError:
        """Return an error that is both a TaskError and an instance of the cause's type."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or isinstance(self, cause_cls) or not _subclassable(cause_cls):
            return self
        name = f"TaskError({cause_cls.__name__})"
        try:
            cls = _DUAL_CLASSES[cause_cls]
        except KeyError:
            cls = type(name, (TaskError, cause_cls), {
                "__init__": _dual_init,
                "__str__": TaskError.__str__,
                "__reduce__": _dual_reduce,
            })
            _DUAL_CLASSES[cause_cls] = cls
        err = cls.__new__(cls)
        _dual_init(err, self.function_name, self.traceback_str, self.cause)
        return err


_DUAL_CLASSES: dict[type, type] = {}


def _subclassable(cls: type) -> bool:
    try:
        type("_probe", (TaskError, cls), {})
    except TypeError:
        return False
    return True


def _dual_init(self, function_name="", traceback_str="", cause=None):
    self.function_name = function_name
    self.traceback_str = traceback_str
    self.cause = cause
    self.args = (function_name, traceback_str, cause)


def _rebuild_dual(function_name, traceback_str, cause):
    return TaskError(function_name, traceback_str, cause).as_instanceof_cause()


def _dual_reduce(self):
    return (_rebuild_dual, (self.function_name, self.traceback_str, self.cause))


class GetTimeoutError(StratoError, TimeoutError):
    """``get`` did not see the value within its timeout."""


class TaskCancelledError(StratoError):
    """The task was cancelled before it produced a value."""


class WorkerCrashedError(StratoError):
    """The worker process running the task died unexpectedly."""


class NodeDiedError(WorkerCrashedError):
    """The node running the task died (missed heartbeats, lost its connection, or was
    reclaimed) and the task had no retries left. Also a ``WorkerCrashedError``: the
    task's worker died with its node, and ``except WorkerCrashedError`` still catches it."""


class ActorError(StratoError):
    """Base of actor failures."""


class ActorDiedError(ActorError):
    """The actor is dead (killed, crashed past max_restarts, or its node died), or its
    constructor raised: then ``cause`` is that exception and ``traceback_str`` its
    traceback (both in the message too)."""

    cause: BaseException | None = None
    traceback_str: str = ""


class ActorUnavailableError(ActorError):
    """The actor's process died while this call ran and the actor is being restarted
    (``max_restarts``): the call did not finish. Calls made later wait for the restart."""


class ObjectLostError(StratoError):
    """Every copy of an object is gone and it cannot be rebuilt."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object died."""


class ObjectStoreFullError(StratoError):
    """A node's object store had no room for an object: its shared memory was full
    (``object_store_memory``) and so was its spill space (the spill limit)."""


# ---------------------------------------------------------------- launcher
class LauncherError(StratoError):
    """Base of cluster launcher errors."""


class ConfigError(LauncherError):
    """The cluster YAML is invalid; the message names the key path and line."""


class CapacityError(LauncherError):
    """The cloud has no capacity for the request (any cloud's wording, one type).

    ``zone`` and ``node_type`` say what was tried so the autoscaler can fall back.
    """

    def __init__(self, message: str, *, node_type: str | None = None, zone: str | None = None,
                 spot: bool | None = None, code: str | None = None):
        super().__init__(message)
        self.node_type = node_type
        self.zone = zone
        self.spot = spot
        self.code = code


class ProviderError(LauncherError):
    """A cloud or host API call failed for a reason other than capacity."""


class CommandError(LauncherError):
    """A command run on a node failed: says which node, which command, exit code, output tail."""

    def __init__(self, node: str, command: str, exit_code: int, output_tail: str = ""):
        self.node = node
        self.command = command
        self.exit_code = exit_code
        self.output_tail = output_tail
        msg = f"command failed on {node} (exit {exit_code}): {command}"
        if output_tail:
            msg += "\n--- last output ---\n" + output_tail
        super().__init__(msg)


class SSHUnavailableError(LauncherError):
    """A node did not accept SSH within the timeout."""


class HostKeyMismatchError(LauncherError):
    """A node's SSH host key differs from the one pinned (or listed in the user's
    known_hosts) for it: nothing was sent to it. The message names the node, the address,
    both fingerprints and how to accept the new key if the change is expected."""

    def __init__(self, message: str, *, node: str = "", address: str = "",
                 expected: str = "", got: str = "", source: str = ""):
        super().__init__(message)
        self.node = node
        self.address = address
        self.expected = expected
        self.got = got
        self.source = source


class OwnerConflictError(LauncherError):
    """Nodes with the cluster's name belong to another owner (another user or another
    ``$STRATO_HOME``): ``up``/``down`` refuse to touch them without ``--force``."""


# Ray's names, so `import strato as ray` code that catches them keeps working.
RayError = StratoError
RayTaskError = TaskError
RayActorError = ActorError


class OutOfMemoryError(StratoError):
    """Ray's error for a task its node's memory monitor killed. strato has no memory
    monitor and never raises it (a worker the kernel kills is a ``WorkerCrashedError``);
    it exists so ``except ray.exceptions.OutOfMemoryError`` in Ray code keeps working."""
