"""A small in-memory fake of the Compute Engine REST API, enough for ``GCPProvider``.

No usable GCE emulator exists, so this serves the handful of calls strato makes
(instances, zone/global operations, firewalls) over plain HTTP on loopback. It behaves as
GCE does where strato depends on it, over (short, configurable) time:

- operations go ``PENDING`` -> ``RUNNING`` -> ``DONE`` over ``op_seconds``; ``wait``
  blocks until ``DONE`` (or ``wait_max_s``); an instance is ``PROVISIONING``, then
  ``STAGING``, and ``RUNNING`` when its insert operation is ``DONE``;
- a stockout is an insert *operation* that ends ``DONE`` with
  ``ZONE_RESOURCE_POOL_EXHAUSTED`` (``fail_next_insert`` once, ``no_capacity`` for good);
- a deleted instance is ``STOPPING`` for ``delete_seconds`` before it is gone;
- ``instances.stop``: the VM is ``STOPPING`` for ``stop_seconds``, then ``TERMINATED``
  (GCE's word for stopped): it keeps its disk, metadata (``ssh-keys``) and internal IP and
  loses its ephemeral external IP; the operation is ``DONE`` once it is ``TERMINATED``.
  Stopping a ``TERMINATED`` VM is a no-op; stopping one that is ``STOPPING`` (being
  stopped or deleted) is ``400 resourceNotReady``;
- ``instances.start`` of a ``TERMINATED`` VM: ``PROVISIONING`` -> ``STAGING`` ->
  ``RUNNING`` (a new external IP; its guest agent installs the metadata's keys again) over
  ``op_seconds``; a start of any VM that is not ``TERMINATED`` is ``400
  resourceNotReady`` (stricter than GCE, which answers a start of a ``RUNNING`` VM with a
  no-op, so strato never relies on that); a start in a zone without capacity
  (``no_capacity``, spot or not) ends ``ZONE_RESOURCE_POOL_EXHAUSTED`` and the VM stays
  ``TERMINATED``;
- a preempted spot instance gets its ``compute.instances.preempted`` operation at once,
  then stays ``STOPPING`` for ``preempt_grace_s`` before ``TERMINATED`` (STOP) or gone
  (DELETE);
- 404 bodies carry ``errors[].reason = "notFound"``; int64 fields are decimal strings.

Instances get made-up addresses (10.128.0.x, 34.x.x.x). Nothing may ever connect to them:
``machines`` (see ``GCEHostPool`` in ``tests/harness/gce_hosts.py``) is told when an
instance is created, boots (with its and the project's ``ssh-keys``), is preempted, is
stopped and started again, and halts, and plays the machine on a namespaced sshd host, as
GCE's guest agent would.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import pytest

SELF_LINK_BASE = "https://www.googleapis.com/compute/v1/"
PREEMPTED_OPERATION = "compute.instances.preempted"

_CAPACITY_MESSAGES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": (
        "The zone '{zone}' does not have enough resources available to fulfill the "
        "request. Try a different zone, or try again later."),
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": (
        "The zone '{zone}' does not have enough resources available to fulfill the "
        "request. '(resource type:compute)'."),
    "QUOTA_EXCEEDED": "Quota 'GPUS_ALL_REGIONS' exceeded. Limit: 0.0 globally.",
}


class Machines(Protocol):
    """What plays the fake's instances (a pool of test hosts); every call is optional."""

    def created(self, name: str) -> None:
        """An instance was inserted (map its addresses before anyone connects)."""

    def booted(self, name: str, ssh_keys: str) -> None:
        """It is RUNNING: accept exactly these ``user:key`` lines (instance + project)."""

    def preempted(self, name: str) -> None:
        """GCE took it back: its metadata ``instance/preempted`` now says TRUE."""

    def stopped(self, name: str) -> None:
        """``instances.stop`` made it TERMINATED: its processes are gone, its disk stays."""

    def started(self, name: str) -> None:
        """A stopped instance is starting again on its own disk (``booted`` follows)."""

    def halted(self, name: str) -> None:
        """It is deleted (or preempted to TERMINATED): everything on it is gone."""


class FakeRequest(NamedTuple):
    """One request the fake served; ``path`` keeps its (decoded) query string."""

    method: str
    path: str
    body: Any


class ApiError(Exception):
    """Raised inside a handler to answer with a Google-style error body."""

    def __init__(self, status: int, message: str, reason: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"reason": self.reason, "message": self.message,
                                      "domain": "global"}]}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fingerprint(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _full_url(project: str, ref: str) -> str:
    """``zones/Z/machineTypes/X`` or ``projects/P/...`` as the selfLink GCE returns."""
    if ref.startswith("http"):
        return ref
    if ref.startswith("projects/"):
        return SELF_LINK_BASE + ref
    return f"{SELF_LINK_BASE}projects/{project}/{ref}"


def _short(url_or_name: str) -> str:
    return url_or_name.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- filter
_TERM = re.compile(
    r"""(?P<field>[A-Za-z_][\w.\-]*)\s*(?P<op>!=|=|\beq\b|\bne\b)\s*
        (?:"(?P<quoted>(?:[^"\\]|\\.)*)"|'(?P<squoted>[^']*)'|(?P<bare>[^\s()]+))""",
    re.VERBOSE,
)


def parse_filter(expr: str | None) -> list[tuple[str, str, str]]:
    """(field, op, value) terms of a Compute list filter; every term must hold (AND).

    Accepts ``a = "x" AND b = "y"``, ``(a = "x") (b = "y")`` and ``a eq x``; ``OR`` is
    not supported (strato never sends it), so the fake refuses it rather than guess.
    """
    if not expr or not expr.strip():
        return []
    if re.search(r"\bOR\b", expr):
        raise ApiError(400, f"fake: OR in filter not supported: {expr}", "invalid")
    terms = []
    for m in _TERM.finditer(expr):
        value = m.group("quoted")
        if value is None:
            value = m.group("squoted") if m.group("squoted") is not None else m.group("bare")
        value = value.replace('\\"', '"')
        op = {"eq": "=", "ne": "!="}.get(m.group("op"), m.group("op"))
        terms.append((m.group("field"), op, value))
    leftover = _TERM.sub("", expr)
    if re.sub(r"\bAND\b|[()\s]", "", leftover):
        raise ApiError(400, f"Invalid value for field 'filter': '{expr}'.", "invalid")
    return terms


def _field(resource: Mapping[str, Any], dotted: str) -> Any:
    value: Any = resource
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def matches(resource: Mapping[str, Any], terms: list[tuple[str, str, str]]) -> bool:
    for field, op, expected in terms:
        actual = _field(resource, field)
        actual_s = "" if actual is None else str(actual)
        if field in ("zone", "machineType") or field.endswith("Link"):
            actual_s = actual_s if "/" in expected else _short(actual_s)
        equal = actual is not None and actual_s == expected
        if (op == "=") != equal:
            return False
    return True


# ---------------------------------------------------------------- state
class GCEFake:
    """In-memory Compute Engine: instances, operations and firewalls of any project.

    Timing knobs (seconds, short so tests stay fast; set them per test): ``op_seconds``
    (PENDING -> RUNNING -> DONE of every operation), ``delete_seconds`` (STOPPING before a
    deleted instance is gone), ``stop_seconds`` (STOPPING before a stopped instance is
    TERMINATED), ``preempt_grace_s`` (STOPPING before a preempted one is
    TERMINATED/gone), ``wait_max_s`` (the longest ``operations.wait`` blocks).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._ids = itertools.count(1000000000000000001)
        self._ips = itertools.count(2)
        self._seq = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Thread | None = None
        self._stopping = False
        self.endpoint = ""
        self.reset()

    # -- lifecycle
    def start(self, host: str = "127.0.0.1") -> GCEFake:
        """Serve on ``host`` (loopback, or a test bridge that namespaced hosts reach)."""
        self._server = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="gce-fake", daemon=True)
        self._thread.start()
        self._stopping = False
        self._timer = threading.Thread(target=self._run_timer, name="gce-fake-timer",
                                       daemon=True)
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._timer is not None:
            self._timer.join(timeout=10)
            self._timer = None

    def reset(self) -> None:
        """Forget everything (each test starts from an empty project, default timings)."""
        with self._lock:
            self._instances: dict[str, dict[str, Any]] = {}
            self._firewalls: dict[str, dict[str, Any]] = {}
            self._operations: dict[str, dict[str, Any]] = {}
            self._insert_failures: dict[str, list[list[Any]]] = {}
            self._no_capacity: set[tuple[str, bool]] = set()
            self._project_ssh_keys: dict[str, str] = {}
            self._timeline: list[tuple[float, int, Callable[[], None]]] = []
            self.requests: list[FakeRequest] = []
            self.request_ids: list[str] = []   # requestId of every call that sent one
            self.machines: Machines | None = None
            self.op_seconds = 0.2
            self.delete_seconds = 0.3
            self.stop_seconds = 0.3
            self.preempt_grace_s = 2.0
            self.wait_max_s = 1.0
            self._cond.notify_all()

    # -- the clock: transitions happen over time, as on GCE
    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` (under the lock) ``delay`` seconds from now."""
        heapq.heappush(self._timeline, (time.monotonic() + delay, next(self._seq), fn))
        self._cond.notify_all()

    def _run_timer(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._timeline and self._timeline[0][0] <= now:
                    _, _, fn = heapq.heappop(self._timeline)
                    fn()
                    self._cond.notify_all()
                    continue
                wait = self._timeline[0][0] - now if self._timeline else None
                self._cond.wait(timeout=wait)

    def _tell(self, event: str, *args: Any) -> None:
        """Tell ``machines`` (outside the lock: it may start or stop processes)."""
        machines = self.machines
        hook = getattr(machines, event, None) if machines is not None else None
        if hook is None:
            return
        self._lock.release()  # held exactly once here: by the timer or a handler
        try:
            hook(*args)
        finally:
            self._lock.acquire()

    # -- views for tests
    @property
    def instances(self) -> dict[str, dict[str, Any]]:
        """Snapshot of stored instances by name (the JSON the API would return)."""
        with self._lock:
            return {k: self._public(v) for k, v in copy.deepcopy(self._instances).items()}

    @property
    def firewalls(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._firewalls)

    @property
    def operations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(o) for o in copy.deepcopy(list(self._operations.values()))]

    def requests_matching(self, method: str, path_part: str) -> list[FakeRequest]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate()`` (called under the lock) holds; False at ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no transition is scheduled (every operation DONE, every VM settled)."""
        assert self.wait_for(lambda: not self._timeline, timeout), "the fake did not settle"

    # -- test hooks
    def fail_next_insert(self, zone: str, reason: str = "ZONE_RESOURCE_POOL_EXHAUSTED", *,
                         message: str | None = None, http_status: int | None = None,
                         after: int = 0) -> None:
        """Make the next instances.insert in ``zone`` (after ``after`` good ones) fail.

        By default it fails the way GCE does for stockouts and quota: the insert is
        accepted and its operation ends ``DONE`` with ``error.errors[0].code = reason``.
        ``http_status`` instead rejects the POST itself with that status. Calls queue up.
        """
        with self._lock:
            self._insert_failures.setdefault(zone, []).append(
                [after, reason, message, http_status])

    def no_capacity(self, zone: str, *, spot: bool = True, on: bool = True) -> None:
        """Every spot (or on-demand) insert in ``zone`` stocks out until called with on=False."""
        with self._lock:
            (self._no_capacity.add if on else self._no_capacity.discard)((zone, spot))

    def set_project_ssh_keys(self, project: str, value: str) -> None:
        """The project's ``commonInstanceMetadata`` ``ssh-keys`` (every VM accepts them)."""
        with self._lock:
            self._project_ssh_keys[project] = value

    def preempt(self, name: str, grace_s: float | None = None) -> None:
        """Take a spot instance back, as GCE does: the ``compute.instances.preempted``
        operation is listed at once, the VM is ``STOPPING`` (its metadata says preempted)
        for ``grace_s`` (default ``preempt_grace_s``), then ``TERMINATED`` (STOP) or gone
        (DELETE). ``grace_s=0`` finishes before returning."""
        with self._lock:
            inst = self._instances.get(name)
            if inst is None:
                raise KeyError(f"no instance {name!r}")
            scheduling = inst.get("scheduling", {})
            if scheduling.get("provisioningModel") != "SPOT" and not scheduling.get("preemptible"):
                raise ValueError(f"instance {name!r} is not spot/preemptible")
            zone = _short(inst["zone"])
            project = inst["selfLink"][len(SELF_LINK_BASE):].split("/")[1]
            op = self._new_operation(project, zone, PREEMPTED_OPERATION, inst, done=True)
            op["statusMessage"] = "Instance was preempted."
            op["user"] = "system"
            inst["status"] = "STOPPING"
            inst["_preempted"] = True
            instance_id = inst["id"]
            self._cond.notify_all()
            self._tell("preempted", name)
            grace = self.preempt_grace_s if grace_s is None else grace_s

            def finish() -> None:
                current = self._instances.get(name)
                if current is None or current["id"] != instance_id:
                    return  # deleted meanwhile
                if scheduling.get("instanceTerminationAction", "STOP") == "DELETE":
                    del self._instances[name]
                else:
                    current["status"] = "TERMINATED"
                    current["lastStopTimestamp"] = _now()
                self._tell("halted", name)

            if grace <= 0:
                finish()
            else:
                self._later(grace, finish)

    def is_preempted(self, name: str) -> bool:
        """What the instance's metadata server says at ``instance/preempted``."""
        with self._lock:
            return bool((self._instances.get(name) or {}).get("_preempted"))

    def set_status(self, name: str, status: str) -> None:
        """Force an instance's status (e.g. ``STAGING``) to test state mapping."""
        with self._lock:
            self._instances[name]["status"] = status

    # -- operations
    def _new_operation(self, project: str, zone: str | None, op_type: str,
                       target: Mapping[str, Any] | None, *, done: bool = False,
                       error: dict[str, Any] | None = None, target_link: str = "",
                       then: Callable[[], None] | None = None,
                       seconds: float | None = None) -> dict[str, Any]:
        """An operation; unless ``done`` it runs PENDING -> RUNNING -> DONE over
        ``seconds`` (default ``op_seconds``) and calls ``then`` (under the lock) as it
        turns DONE."""
        op_id = str(next(self._ids))
        name = f"operation-{int(time.time() * 1000)}-{op_id[-8:]}"
        scope = f"projects/{project}/zones/{zone}" if zone else f"projects/{project}/global"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": op_id,
            "name": name,
            "operationType": op_type,
            "targetLink": target["selfLink"] if target else target_link,
            "status": "DONE" if done else "PENDING",
            "progress": 100 if done else 0,
            "insertTime": _now(),
            "selfLink": f"{SELF_LINK_BASE}{scope}/operations/{name}",
        }
        if target:
            op["targetId"] = target["id"]
        if zone:
            op["zone"] = f"{SELF_LINK_BASE}projects/{project}/zones/{zone}"
        if done:
            op["startTime"] = op["endTime"] = _now()
        self._operations[name] = op
        if not done:
            def running() -> None:
                op.update(status="RUNNING", progress=50, startTime=_now())

            def finish() -> None:
                op.update(status="DONE", progress=100, endTime=_now())
                if error:
                    op["error"] = {"errors": [error["error"]]}
                    op["httpErrorStatusCode"] = error["http_status"]
                    op["httpErrorMessage"] = error["http_message"]
                if then is not None:
                    then()

            took = self.op_seconds if seconds is None else seconds
            self._later(took / 4, running)
            self._later(took, finish)
        return op

    def _wait_operation(self, project: str, name: str) -> dict[str, Any]:
        """``operations.wait``: block until DONE or ``wait_max_s``, return it either way."""
        op = self._get_operation(project, name)
        deadline = time.monotonic() + self.wait_max_s
        while op["status"] != "DONE" and time.monotonic() < deadline:
            self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
        return op

    @staticmethod
    def _public(resource: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}

    # -- request dispatch
    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        with self._lock:
            # requestId (an idempotency token, unique per call) is kept apart, so that
            # paths of the same call compare equal
            if "requestId" in query:
                self.request_ids.append(query["requestId"])
                rest = "&".join(f"{k}={v}" for k, v in parse_qsl(split.query)
                                if k != "requestId")
                raw_path = split.path + (f"?{rest}" if rest else "")
            self.requests.append(FakeRequest(method, unquote(raw_path), body))
            try:
                return 200, self._route(method, parts, query, body)
            except ApiError as e:
                return e.status, e.body()

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> Any:
        if parts[:2] != ["compute", "v1"] or len(parts) < 4 or parts[2] != "projects":
            raise ApiError(501, f"fake: unsupported path /{'/'.join(parts)}", "notImplemented")
        project, rest = parts[3], parts[4:]
        match (method, rest):
            case ("GET", ["aggregated", "instances"]):
                return self._aggregated(project, "instances", self._instances.values(), query)
            case ("GET", ["aggregated", "operations"]):
                return self._aggregated(project, "operations", self._operations.values(), query)
            case ("POST", ["zones", zone, "instances"]):
                return self._insert_instance(project, zone, body or {})
            case ("GET", ["zones", zone, "instances"]):
                items = [i for i in self._instances.values() if self._in_zone(i, project, zone)]
                return self._list("compute#instanceList", items, query)
            case ("GET", ["zones", zone, "instances", name]):
                return self._public(self._get_instance(project, zone, name))
            case ("DELETE", ["zones", zone, "instances", name]):
                return self._delete_instance(project, zone, name)
            case ("POST", ["zones", zone, "instances", name, "setLabels"]):
                return self._set_labels(project, zone, name, body or {})
            case ("POST", ["zones", zone, "instances", name, "stop"]):
                return self._stop_instance(project, zone, name)
            case ("POST", ["zones", zone, "instances", name, "start"]):
                return self._start_instance(project, zone, name)
            case ("GET", ["zones", zone, "operations"]):
                items = [o for o in self._operations.values() if self._in_zone(o, project, zone)]
                return self._list("compute#operationList", items, query)
            case ("GET", ["zones", _, "operations", name]) | ("GET", ["global", "operations", name]):
                return self._public(self._get_operation(project, name))
            case ("POST", ["zones", _, "operations", name, "wait"]) | (
                    "POST", ["global", "operations", name, "wait"]):
                return self._public(self._wait_operation(project, name))
            case ("GET", ["global", "firewalls", name]):
                fw = self._firewalls.get(f"{project}/{name}")
                if fw is None:
                    raise ApiError(404, f"The resource 'projects/{project}/global/firewalls/"
                                        f"{name}' was not found", "notFound")
                return fw
            case ("POST", ["global", "firewalls"]):
                return self._insert_firewall(project, body or {})
        raise ApiError(501, f"fake: unsupported call {method} /{'/'.join(parts)}",
                       "notImplemented")

    @staticmethod
    def _in_zone(resource: Mapping[str, Any], project: str, zone: str) -> bool:
        return resource.get("zone", "").endswith(f"projects/{project}/zones/{zone}")

    def _list(self, kind: str, items: Any, query: dict[str, str]) -> dict[str, Any]:
        terms = parse_filter(query.get("filter"))
        return {"kind": kind, "id": "fake",
                "items": [self._public(i) for i in items if matches(i, terms)]}

    def _aggregated(self, project: str, key: str, items: Any,
                    query: dict[str, str]) -> dict[str, Any]:
        terms = parse_filter(query.get("filter"))
        scoped: dict[str, dict[str, Any]] = {}
        for item in items:
            zone_url = item.get("zone", "")
            if f"projects/{project}/" not in item.get("selfLink", "") or not zone_url:
                continue
            if matches(item, terms):
                scope = scoped.setdefault(f"zones/{_short(zone_url)}", {key: []})
                scope[key].append(self._public(item))
        return {"kind": "compute#aggregatedList", "id": f"projects/{project}", "items": scoped}

    def _get_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        inst = self._instances.get(name)
        if inst is None or not self._in_zone(inst, project, zone):
            raise ApiError(404, f"The resource 'projects/{project}/zones/{zone}/instances/"
                                f"{name}' was not found", "notFound")
        return inst

    def _get_operation(self, project: str, name: str) -> dict[str, Any]:
        op = self._operations.get(name)
        if op is None or f"projects/{project}/" not in op["selfLink"]:
            raise ApiError(404, f"The resource 'projects/{project}/operations/{name}' "
                                "was not found", "notFound")
        return op

    def _delete_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """The VM is STOPPING for ``delete_seconds``; the operation is DONE once it is gone."""
        inst = self._get_instance(project, zone, name)
        inst["status"] = "STOPPING"
        instance_id = inst["id"]

        def gone() -> None:
            current = self._instances.get(name)
            if current is not None and current["id"] == instance_id:
                del self._instances[name]
                self._tell("halted", name)

        op = self._new_operation(project, zone, "delete", inst, then=gone,
                                 seconds=max(self.delete_seconds, 0.01))
        return self._public(op)

    @staticmethod
    def _not_ready(project: str, zone: str, name: str) -> ApiError:
        """GCE's answer to a stop/start the instance's current status does not allow."""
        return ApiError(400, f"The resource 'projects/{project}/zones/{zone}/instances/"
                             f"{name}' is not ready", "resourceNotReady")

    def _stop_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """STOPPING for ``stop_seconds``, then TERMINATED with disk and metadata kept (the
        ephemeral external IP is released); the operation is DONE when it is TERMINATED."""
        inst = self._get_instance(project, zone, name)
        if inst["status"] == "TERMINATED":
            return self._public(self._new_operation(project, zone, "stop", inst, done=True))
        if inst["status"] in ("STOPPING", "SUSPENDING"):
            raise self._not_ready(project, zone, name)
        inst["status"] = "STOPPING"

        def stopped() -> None:
            if inst is self._instances.get(name) and inst["status"] == "STOPPING" \
                    and not inst.get("_preempted"):
                inst["status"] = "TERMINATED"
                inst["lastStopTimestamp"] = _now()
                for nic in inst.get("networkInterfaces") or []:
                    for ac in nic.get("accessConfigs") or []:
                        ac.pop("natIP", None)
                self._tell("stopped", name)

        return self._public(self._new_operation(project, zone, "stop", inst, then=stopped,
                                                seconds=max(self.stop_seconds, 0.01)))

    def _start_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """A TERMINATED VM boots again on its disk: PROVISIONING -> STAGING -> RUNNING,
        with a new external IP and the keys of its (kept) metadata."""
        inst = self._get_instance(project, zone, name)
        if inst["status"] != "TERMINATED":
            raise self._not_ready(project, zone, name)
        scheduling = inst.get("scheduling") or {}
        spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
        if (zone, spot) in self._no_capacity:
            reason = "ZONE_RESOURCE_POOL_EXHAUSTED"
            error = {"error": {"code": reason,
                               "message": _CAPACITY_MESSAGES[reason].format(zone=zone)},
                     "http_status": 503, "http_message": "SERVICE UNAVAILABLE"}
            return self._public(self._new_operation(project, zone, "start", inst,
                                                    error=error))
        inst["status"] = "PROVISIONING"
        inst.pop("_preempted", None)
        n = next(self._ips)
        for nic in inst.get("networkInterfaces") or []:
            for ac in nic.get("accessConfigs") or []:
                ac["natIP"] = f"34.{100 + (n >> 16) % 100}.{(n >> 8) & 255}.{n & 255}"
        self._tell("started", name)
        self._stage(name, inst)
        return self._public(self._new_operation(project, zone, "start", inst,
                                                then=self._running(project, name, inst)))

    def _stage(self, name: str, inst: dict[str, Any]) -> None:
        """PROVISIONING -> STAGING halfway through its operation (RUNNING when it is DONE)."""
        def staging() -> None:
            if inst is self._instances.get(name) and inst["status"] == "PROVISIONING":
                inst["status"] = "STAGING"

        self._later(self.op_seconds / 2, staging)

    def _running(self, project: str, name: str, inst: dict[str, Any]) -> Callable[[], None]:
        """What turns a STAGING instance RUNNING (its guest agent installs the keys)."""
        def running() -> None:
            if inst is self._instances.get(name) and inst["status"] == "STAGING":
                inst["status"] = "RUNNING"
                inst["lastStartTimestamp"] = _now()
                self._tell("booted", name, self._ssh_keys(project, inst))

        return running

    def _ssh_keys(self, project: str, inst: Mapping[str, Any]) -> str:
        """The ``ssh-keys`` a guest agent installs: the instance's, then the project's."""
        items = (inst.get("metadata") or {}).get("items") or []
        own = [str(i.get("value", "")) for i in items if i.get("key") == "ssh-keys"]
        return "\n".join([*own, self._project_ssh_keys.get(project, "")]).strip()

    def _insert_instance(self, project: str, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, f"Invalid value for field 'resource.name': '{name}'.", "invalid")
        if not body.get("machineType"):
            raise ApiError(400, "Invalid value for field 'resource.machineType': ''.", "invalid")
        for key, value in (body.get("labels") or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key) or not re.fullmatch(
                    r"[a-z0-9_-]{0,63}", value):
                raise ApiError(400, f"Invalid value for field 'resource.labels': "
                                    f"'{key}={value}'.", "invalid")
        if name in self._instances:
            raise ApiError(409, f"The resource 'projects/{project}/zones/{zone}/instances/"
                                f"{name}' already exists", "alreadyExists")
        self_link = f"{SELF_LINK_BASE}projects/{project}/zones/{zone}/instances/{name}"
        scheduling = body.get("scheduling") or {}
        spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
        failure: tuple[str, str | None, int | None] | None = None
        failures = self._insert_failures.get(zone)
        if failures and failures[0][0] > 0:
            failures[0][0] -= 1
        elif failures:
            _, reason, message, http_status = failures.pop(0)
            failure = (reason, message, http_status)
        elif (zone, spot) in self._no_capacity:
            failure = ("ZONE_RESOURCE_POOL_EXHAUSTED", None, None)
        if failure is not None:
            reason, message, http_status = failure
            message = message or _CAPACITY_MESSAGES.get(reason, reason).format(zone=zone)
            if http_status is not None:
                raise ApiError(http_status, message, reason)
            error = {"error": {"code": reason, "message": message},
                     "http_status": 503 if "EXHAUSTED" in reason else 403,
                     "http_message": "SERVICE UNAVAILABLE" if "EXHAUSTED" in reason
                     else "FORBIDDEN"}
            op = self._new_operation(project, zone, "insert", None, error=error,
                                     target_link=self_link)
            return self._public(op)
        inst = copy.deepcopy(body)
        n = next(self._ips)
        inst.update({
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "status": "PROVISIONING",
            "zone": f"{SELF_LINK_BASE}projects/{project}/zones/{zone}",
            "selfLink": self_link,
            "creationTimestamp": _now(),
            "machineType": _full_url(project, inst["machineType"]),
            "labels": dict(inst.get("labels") or {}),
            "fingerprint": _fingerprint(body),
        })
        inst["labelFingerprint"] = _fingerprint(inst["labels"])
        nics = inst.get("networkInterfaces") or [{"network": "global/networks/default"}]
        for i, nic in enumerate(nics):
            nic.setdefault("name", f"nic{i}")
            nic["networkIP"] = f"10.128.{(n >> 8) & 15}.{n & 255}"
            for ac in nic.get("accessConfigs", []):
                ac["natIP"] = f"34.{100 + (n >> 16) % 100}.{(n >> 8) & 255}.{n & 255}"
        inst["networkInterfaces"] = nics
        self._instances[name] = inst
        instance_id = inst["id"]
        self._tell("created", name)
        self._stage(name, inst)
        op = self._new_operation(project, zone, "insert", inst,
                                 then=self._running(project, name, inst))
        assert op["targetId"] == instance_id
        return self._public(op)

    def _set_labels(self, project: str, zone: str, name: str,
                    body: dict[str, Any]) -> dict[str, Any]:
        inst = self._get_instance(project, zone, name)
        if body.get("labelFingerprint") != inst["labelFingerprint"]:
            raise ApiError(412, "Labels fingerprint either invalid or resource labels have "
                                "changed", "conditionNotMet")
        inst["labels"] = dict(body.get("labels") or {})
        inst["labelFingerprint"] = _fingerprint(inst["labels"])
        return self._public(self._new_operation(project, zone, "setLabels", inst))

    def _insert_firewall(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        key = f"{project}/{name}"
        if key in self._firewalls:
            raise ApiError(409, f"The resource 'projects/{project}/global/firewalls/{name}' "
                                "already exists", "alreadyExists")
        fw = copy.deepcopy(body)
        fw.update({"kind": "compute#firewall", "id": str(next(self._ids)),
                   "creationTimestamp": _now(),
                   "selfLink": f"{SELF_LINK_BASE}projects/{project}/global/firewalls/{name}"})
        self._firewalls[key] = fw
        return self._public(self._new_operation(project, None, "insert", fw))


def _make_handler(fake: GCEFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out separately: avoid 40 ms stalls

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload = 400, ApiError(400, "bad JSON", "parseError").body()
            else:
                status, payload = fake.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def gce_fake_server() -> Iterator[GCEFake]:
    """One fake Compute API server for the whole session (state is reset per test)."""
    fake = GCEFake().start()
    yield fake
    fake.stop()


@pytest.fixture
def gce_fake(gce_fake_server: GCEFake) -> Iterator[GCEFake]:
    """The fake Compute API with empty state; ``.endpoint`` is ``http://127.0.0.1:PORT``."""
    gce_fake_server.reset()
    yield gce_fake_server
    gce_fake_server.reset()


@pytest.fixture
def gce_provider_config(gce_fake: GCEFake) -> dict[str, Any]:
    """A GCP ``provider:`` section pointing at the fake."""
    return {"type": "gcp", "project_id": "strato-test", "availability_zone": "us-central1-a",
            "api_endpoint": gce_fake.endpoint}
