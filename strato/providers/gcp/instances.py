"""GCE instances after their creation: listing (preemptions included), deleting, stopping
and starting, labels. Mixed into ``GCPProvider`` (``provider.py``), which holds the state.

``Node.id`` is the instance name; instances are listed across all zones with one
aggregated call, so nodes in any zone are found by a fresh process too. ``TAG_NAME`` is
not a label: the instance name (``strato-<cluster>-<kind>-<6 hex>``) plays its part.

Stopping (autostop with ``down: false``): on-demand instances are stopped
(``instances.stop``: ``STOPPING``, then ``TERMINATED``, GCE's word for a stopped VM that
keeps its disk, metadata and internal IP; its ephemeral external IP is released) and
started again by the next ``up`` (``instances.start``, only once they are
``TERMINATED``: GCE refuses to start a VM still ``STOPPING``). Spot instances are deleted
instead, as on AWS: strato creates them with ``instanceTerminationAction: DELETE``, and a
stopped spot VM would start again only when spot capacity allows. Stopped instances are
listed like running ones (so ``down`` and ``status`` see them); preempted ones only with
``include_terminated``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from strato.exceptions import ProviderError
from strato.providers.base import TAG_CLUSTER, TAG_KIND, TAG_NAME, Node, NodeState
from strato.providers.gcp.api import api_errors, http_error_text
from strato.providers.gcp.names import is_spot, label_key, label_value, parse_time, short

PREEMPTED_OPERATION = "compute.instances.preempted"

_STATE_MAP = {
    "PROVISIONING": NodeState.PENDING,
    "STAGING": NodeState.PENDING,
    "RUNNING": NodeState.RUNNING,
    "REPAIRING": NodeState.RUNNING,
    "STOPPING": NodeState.STOPPING,
    "SUSPENDING": NodeState.STOPPING,
    "TERMINATED": NodeState.STOPPED,  # GCE's TERMINATED is a stopped VM that still exists
    "SUSPENDED": NodeState.STOPPED,
}

# Statuses ``instances.stop`` is called for (TERMINATED is stopped already; a STOPPING
# VM is on its way, and GCE refuses to stop it again), those ``start`` waits out, and how
# often it looks.
_STOPPABLE = ("PROVISIONING", "STAGING", "RUNNING", "REPAIRING")
_SETTLING = ("STOPPING", "SUSPENDING")
_POLL_S = 1.0


class InstancesMixin:
    """``list_nodes``, ``terminate_nodes``, ``stop_nodes``, ``start_nodes`` and
    ``set_tags`` of ``GCPProvider``."""

    # kept by GCPProvider (its __init__ says what each is), as are ``clients``,
    # ``_wait`` and ``_operation_failure``
    provider_config: dict[str, Any]
    cluster_name: str
    project: str
    _name_re: re.Pattern[str]
    _zones: dict[str, str]
    _last_tags: dict[str, dict[str, str]]
    _deleted: set[str]

    # -------------------------------------------------------------- list
    def _node(self, inst: Any, preempted_ops: Collection[str] = ()) -> Node:
        name = inst.name
        labels = dict(inst.labels)
        zone = short(inst.zone)
        self._zones[name] = zone
        self._last_tags[name] = labels
        state = _STATE_MAP.get(inst.status, NodeState.PENDING)
        spot = is_spot(inst)
        stopped = state == NodeState.STOPPED
        private_ip = public_ip = None
        if inst.network_interfaces:
            nic = inst.network_interfaces[0]
            private_ip = nic.network_i_p or None
            if nic.access_configs:
                public_ip = nic.access_configs[0].nat_i_p or None
        return Node(
            id=name, state=state, tags={**labels, TAG_NAME: name},
            private_ip=private_ip, public_ip=public_ip, spot=spot,
            # GCE lists the preempted operation at once, while the VM is still STOPPING
            # through its shutdown grace: it is preempted from then on, not "stopping"
            preempted=name in preempted_ops or (stopped and spot),
            zone=zone, instance_type=short(inst.machine_type) or None,
            launch_time=parse_time(inst.creation_timestamp),
        )

    def _filter(self, tag_filters: Mapping[str, str]) -> str:
        labels = {label_key(k): label_value(v) for k, v in tag_filters.items() if k != TAG_NAME}
        labels[TAG_CLUSTER] = label_value(self.cluster_name)
        return " AND ".join(f'(labels.{k} = "{v}")' for k, v in sorted(labels.items()))

    @staticmethod
    def _matches(node: Node, tag_filters: Mapping[str, str]) -> bool:
        for key, value in tag_filters.items():
            if key == TAG_NAME:
                if node.id != value:
                    return False
            elif node.tags.get(label_key(key)) != label_value(value):
                return False
        return True

    def _list_instances(self, tag_filters: Mapping[str, str]) -> list[Any]:
        errors = api_errors()
        request = {"project": self.project, "filter": self._filter(tag_filters)}
        try:
            return [inst for _, scoped in self.clients.instances.aggregated_list(request=request)
                    for inst in scoped.instances]
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE list instances: {http_error_text(e)}") from e

    def _preempted_operations(self) -> dict[str, tuple[str, float | None]]:
        """Instance name -> (zone, time) of recent preemptions of this cluster's instances."""
        errors = api_errors()
        lookback = float(self.provider_config.get("preemption_lookback_s", 3600))
        request = {"project": self.project,
                   "filter": f'operationType = "{PREEMPTED_OPERATION}"'}
        found: dict[str, tuple[str, float | None]] = {}
        try:
            pages = self.clients.global_operations.aggregated_list(request=request)
            operations = [op for _, scoped in pages for op in scoped.operations]
        except errors.GoogleAPICallError as e:
            raise ProviderError(f"GCE list operations: {http_error_text(e)}") from e
        for op in operations:
            name = short(op.target_link)
            if not (self._name_re.fullmatch(name) or name in self._last_tags):
                continue
            when = parse_time(op.insert_time)
            if when is not None and when < time.time() - lookback:
                continue
            found[name] = (short(op.zone), when)
        return found

    def list_nodes(self, tag_filters: Mapping[str, str] | None = None, *,
                   include_terminated: bool = False) -> list[Node]:
        """Instances with this cluster's label (and ``tag_filters``), from every zone,
        stopped ones (GCE ``TERMINATED``/``SUSPENDED``) included.

        Preempted spot instances that GCE stopped, and those it deleted (found from
        ``compute.instances.preempted`` operations), are returned only with
        ``include_terminated``.
        """
        tag_filters = dict(tag_filters or {})
        preempted = self._preempted_operations() if include_terminated else {}
        nodes = [self._node(inst, set(preempted))
                 for inst in self._list_instances(tag_filters)]
        nodes = [n for n in nodes if self._matches(n, tag_filters) and (
            include_terminated or n.state != NodeState.STOPPED or not n.preempted)]
        present = {n.id for n in nodes}
        for name, (zone, _when) in sorted(preempted.items()):
            if name in present or name in self._deleted:
                continue
            known = self._last_tags.get(name)
            if known is None:
                match = self._name_re.fullmatch(name)
                known = {TAG_CLUSTER: label_value(self.cluster_name),
                         TAG_KIND: match.group(1) if match else ""}
            tags = {**known, TAG_NAME: name}
            gone = Node(id=name, state=NodeState.TERMINATED, tags=tags, spot=True,
                        preempted=True, zone=zone or None)
            if not self._matches(gone, tag_filters):
                continue
            # Without filters every surviving instance is in ``present``; with them, a
            # stopped (not deleted) instance may just have been filtered out.
            if tag_filters and self._instance_exists(name, zone):
                continue
            nodes.append(gone)
        return nodes

    def _instance_exists(self, name: str, zone: str) -> bool:
        errors = api_errors()
        if not zone:
            return False
        try:
            self.clients.instances.get(project=self.project, zone=zone, instance=name)
        except errors.NotFound:
            return False
        return True

    # -------------------------------------------------------------- terminate / tags
    def _zone_of(self, name: str) -> str | None:
        """The zone of one of our instances (one listing refreshes all we don't know)."""
        if name not in self._zones:
            for inst in self._list_instances({}):
                self._zones[inst.name] = short(inst.zone)
        return self._zones.get(name)

    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Delete the instances (all requests first, then wait); missing ones are ignored."""
        errors = api_errors()
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        names = list(dict.fromkeys(node_ids))
        if any(name not in self._zones for name in names):
            self._zone_of(next(n for n in names if n not in self._zones))
        for name in names:
            zone = self._zones.get(name)
            self._deleted.add(name)
            if zone is None:
                continue
            self._issue(self.clients.instances.delete_unary, name, zone, pending, problems)
        for name, zone, op in pending:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.NotFound:
                failure = None
            if failure and "NOT_FOUND" not in failure.code:
                problems.append(f"{name}: {failure.message}")
        for name in node_ids:
            self._zones.pop(name, None)
        if problems:
            raise ProviderError("GCE could not delete " + "; ".join(problems))

    # -------------------------------------------------------------- stop / start
    def _current(self, names: Collection[str]) -> dict[str, Any]:
        """The instances of these names that exist now (one listing; zones refreshed)."""
        found = {}
        for inst in self._list_instances({}):
            self._zones[inst.name] = short(inst.zone)
            if inst.name in names:
                found[inst.name] = inst
        return found

    def _issue(self, call, name: str, zone: str, pending: list, problems: list) -> None:
        """Start one instance operation (delete, stop, start): its operation joins
        ``pending``; an error joins ``problems``; an instance GCE no longer knows is
        skipped."""
        errors = api_errors()
        try:
            op = call(project=self.project, zone=zone, instance=name)
        except errors.NotFound:
            return
        except errors.GoogleAPICallError as e:
            problems.append(f"{name}: {http_error_text(e)}")
            return
        pending.append((name, zone, op))

    def _wait_all(self, pending: list[tuple[str, str, Any]], problems: list[str]) -> None:
        """Wait for every (name, zone, operation); failures other than NOT_FOUND are added
        to ``problems`` (with a capacity code where GCE gave one)."""
        errors = api_errors()
        for name, zone, op in pending:
            try:
                failure = self._operation_failure(self._wait(op, zone))
            except errors.NotFound:
                failure = None
            if failure and "NOT_FOUND" not in failure.code:
                problems.append(f"{name}: [{failure.capacity or failure.code}] "
                                f"{failure.message}")

    def stop_nodes(self, node_ids: Sequence[str]) -> None:
        """Stop on-demand instances and wait until they are ``TERMINATED`` (stopped, disk
        kept); spot instances are deleted instead (see the module docstring). Instances
        already stopped or stopping, and names GCE no longer knows, are skipped."""
        names = list(dict.fromkeys(node_ids))
        if not names:
            return
        current = self._current(set(names))
        spot = [n for n in names if n in current and is_spot(current[n])]
        if spot:
            self.terminate_nodes(spot)
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        for name in names:
            inst = current.get(name)
            if inst is None or name in spot or inst.status not in _STOPPABLE:
                continue
            self._issue(self.clients.instances.stop_unary, name, short(inst.zone), pending,
                        problems)
        self._wait_all(pending, problems)
        if problems:
            raise ProviderError("GCE could not stop " + "; ".join(problems))

    def start_nodes(self, node_ids: Sequence[str], timeout: float = 600.0) -> None:
        """Start stopped (``TERMINATED``) instances once none is still ``STOPPING``, and
        wait until they are ``RUNNING``. Names GCE no longer knows are skipped (a VM that
        was being deleted, not stopped); running ones are left as they are."""
        names = list(dict.fromkeys(node_ids))
        if not names:
            return
        deadline = time.monotonic() + timeout
        while True:
            current = self._current(set(names))
            busy = sorted(n for n, i in current.items() if i.status in _SETTLING)
            if not busy:
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"GCE: {', '.join(busy)} still stopping after "
                                    f"{timeout:.0f}s")
            time.sleep(_POLL_S)
        pending: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        for name, inst in current.items():
            if inst.status == "SUSPENDED":
                problems.append(f"{name}: it is SUSPENDED (strato does not resume "
                                "instances: resume or delete it)")
                continue
            if inst.status != "TERMINATED":
                continue
            self._issue(self.clients.instances.start_unary, name, short(inst.zone), pending,
                        problems)
        self._wait_all(pending, problems)
        if problems:
            raise ProviderError("GCE could not start " + "; ".join(problems))
        started = {name for name, _, _ in pending}
        while started:
            current = self._current(started)
            states = {n: current[n].status if n in current else "deleted" for n in started}
            if all(s == "RUNNING" for s in states.values()):
                return
            if time.monotonic() > deadline or any(
                    s in ("deleted", "TERMINATED", "STOPPING") for s in states.values()):
                raise ProviderError("GCE: started " + ", ".join(
                    f"{n} but it is {s}" for n, s in sorted(states.items())))
            time.sleep(_POLL_S)

    def set_tags(self, node_id: str, tags: Mapping[str, str]) -> None:
        """Merge ``tags`` into the instance's labels (retrying if they changed meanwhile)."""
        errors = api_errors()
        zone = self._zone_of(node_id)
        if zone is None:
            raise ProviderError(f"GCE instance {node_id} not found")
        new = {label_key(k): label_value(v) for k, v in tags.items() if k != TAG_NAME}
        for attempt in range(5):
            try:
                inst = self.clients.instances.get(project=self.project, zone=zone,
                                                  instance=node_id)
                labels = {**dict(inst.labels), **new}
                op = self.clients.instances.set_labels_unary(
                    project=self.project, zone=zone, instance=node_id,
                    instances_set_labels_request_resource={
                        "labels": labels, "label_fingerprint": inst.label_fingerprint})
                failure = self._operation_failure(self._wait(op, zone))
            except errors.PreconditionFailed:
                if attempt == 4:
                    raise ProviderError(f"GCE labels of {node_id} keep changing") from None
                continue
            except errors.GoogleAPICallError as e:
                raise ProviderError(f"GCE set labels on {node_id}: "
                                    f"{http_error_text(e)}") from e
            if failure:
                raise ProviderError(f"GCE set labels on {node_id}: {failure.message}")
            self._last_tags[node_id] = labels
            return
