"""The one interface every node provider implements: synchronous, batched, idempotent.

Adding a place nodes come from means adding one module with a ``NodeProvider`` subclass
and a module-level ``PROVIDER = ThatClass``, plus its line in ``providers/__init__.py``;
nothing else changes. What differs between providers (can it make nodes, are they on
this machine, which preemption notice, default login, its own config checks, local
cleanup) is said by the class below, never by a test of the provider's type name.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strato.exceptions import ProviderError

# Tag keys every provider writes on the nodes it creates (labels on GCP: lower-case,
# so keys use only [a-z0-9-_]). ``down`` finds nodes by these, never by local memory.
TAG_CLUSTER = "strato-cluster"
TAG_KIND = "strato-node-kind"          # "head" | "worker"
TAG_NODE_TYPE = "strato-node-type"     # key of available_node_types
TAG_LAUNCH_HASH = "strato-launch-hash"  # hash of node_config (+ provider bits)
TAG_SETUP_HASH = "strato-setup-hash"   # hash of setup commands / file mounts
TAG_STATUS = "strato-status"           # see NodeStatus
TAG_GOING_DOWN = "strato-going-down"   # on the head: "all" | "workers" while `down` runs;
                                      # no autoscaler launches for such a cluster
TAG_OWNER = "strato-owner"             # who launched it (localfiles.owner_id): `up`/`down`
                                      # touch only their own owner's nodes
TAG_AUTOSTOPPED = "strato-autostopped"  # on the head: epoch seconds when the head's monitor
                                      # autostopped the cluster (the laptop reads it later)
TAG_NAME = "Name"


class NodeKind(str, enum.Enum):
    HEAD = "head"
    WORKER = "worker"


class NodeStatus(str, enum.Enum):
    """Launcher-level status kept in the TAG_STATUS tag."""

    PENDING = "pending"            # created, not yet set up
    SETTING_UP = "setting-up"
    UP_TO_DATE = "up-to-date"
    UPDATE_FAILED = "update-failed"


class GoingDown(str, enum.Enum):
    """Values of TAG_GOING_DOWN; the empty string means the cluster is not going down."""

    ALL = "all"            # `down`: everything goes, the monitor exits
    WORKERS = "workers"    # `down --workers-only`: no launches until it is over


class NodeState(str, enum.Enum):
    """What the provider says about the machine itself."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class Node:
    """One machine as the provider sees it."""

    id: str
    state: NodeState
    tags: Mapping[str, str] = field(default_factory=dict)
    private_ip: str | None = None
    public_ip: str | None = None
    spot: bool = False
    preempted: bool = False          # the cloud took it back (spot interruption)
    zone: str | None = None
    instance_type: str | None = None
    launch_time: float | None = None  # unix seconds

    @property
    def node_type(self) -> str | None:
        return self.tags.get(TAG_NODE_TYPE)

    @property
    def kind(self) -> str | None:
        return self.tags.get(TAG_KIND)

    @property
    def is_alive(self) -> bool:
        return self.state in (NodeState.PENDING, NodeState.RUNNING)


@dataclass(frozen=True)
class NodeTypeSpec:
    """What the provider needs to create nodes of one type (from the cluster config)."""

    name: str
    node_config: Mapping[str, Any]
    spot: bool = False
    zones: Sequence[str] = ()
    max_price: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SpotIdiom:
    """A cloud's own way of asking for spot capacity inside ``node_config``, as Ray's
    cluster YAMLs write it (AWS ``InstanceMarketOptions``, GCE ``scheduling``)."""

    path: tuple[str | int, ...]      # where, inside node_config
    text: str                        # what it says, e.g. "InstanceMarketOptions.MarketType: spot"
    max_price: float | None = None   # a price cap it sets (per hour), if any


@dataclass(frozen=True)
class ConfigProblem:
    """One finding of a provider's config check, at a key path of the cluster YAML."""

    path: tuple[str | int, ...]
    message: str
    warning: bool = False


def config_sections(config: Mapping[str, Any]) -> tuple[Mapping[str, Any],
                                                        Mapping[str, Any]]:
    """The ``provider`` and ``available_node_types`` sections of a raw config, ``{}``
    where absent or not mappings (``check_config`` runs before the type checks)."""
    provider = config.get("provider")
    types = config.get("available_node_types")
    return (provider if isinstance(provider, Mapping) else {},
            types if isinstance(types, Mapping) else {})


class NodeProvider(abc.ABC):
    """Creates, lists and removes the machines of one cluster.

    ``provider_config`` is the ``provider:`` section of the cluster YAML as a dict;
    ``cluster_name`` scopes every call. Implementations build their SDK clients in one
    factory that honours an endpoint override, so tests point them at moto or a fake.
    """

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str):
        self.provider_config = dict(provider_config)
        self.cluster_name = cluster_name

    # ------------------------------------------------------------ what this provider is
    #: whether ``prepare`` must run before nodes can be reached (it makes or finds the
    #: SSH key the cloud installs on them)
    needs_prepare_to_reach_nodes: bool = False
    #: whether nodes can be made on demand; False for a fixed pool whose nodes are only
    #: claimed (SSH hosts): the autoscaler then never launches nor terminates, it only
    #: restarts runtimes there
    can_create_nodes: bool = True
    #: whether nodes are processes on this machine (each in its own ``local_dir``):
    #: reached without SSH, running this Python, the head on any free port and the
    #: monitor beside the launcher
    nodes_on_this_machine: bool = False
    #: the login user of a node when ``auth.ssh_user`` is not set (None: the local user)
    default_ssh_user: str | None = None
    #: whether terminating a node only releases it and the provider stops strato there
    #: itself over SSH: the launcher then hands it ``auth`` (``ssh_user``,
    #: ``ssh_private_key``, ``ssh_port``) and a ``stop_command`` in its config
    stops_strato_on_terminate: bool = False
    #: whether nodes can be stopped (kept, disks and all, not billed for compute) and
    #: started again: ``stop_nodes``/``start_nodes`` (autostop with ``down: false``)
    can_stop_nodes: bool = False

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        """This provider's own checks of a cluster config (a plain dict, Ray-style defaults
        filled, types not yet validated: guard every access). Default: none."""
        return []

    @classmethod
    def spot_idiom(cls, node_config: Mapping[str, Any]) -> SpotIdiom | None:
        """Whether ``node_config`` asks this cloud for spot capacity in the cloud's own
        words; the config then treats the node type as ``spot: true`` (and rejects
        ``spot: false`` beside it). ``node_config`` is unvalidated: guard every access.
        Default: this provider has no such idiom."""
        return None

    @property
    def spot_notice(self) -> str | None:
        """The preemption notice format (``aws`` / ``gcp`` instance metadata) the node agent
        of a spot node watches; default: ``provider.spot_notice`` (rehearsing locally)."""
        return self.provider_config.get("spot_notice")

    @property
    def user_known_hosts_file(self) -> str | None:
        """An OpenSSH known_hosts of the user's that is the authority for the keys of the
        nodes it lists (hosts the user already knows); None: keys are only pinned on
        first contact (cloud machines are new to everyone)."""
        return None

    def local_dir(self, node_id: str) -> Path:
        """The node's own directory here (its runtime temp dir); only for providers whose
        ``nodes_on_this_machine``."""
        raise ProviderError(f"{type(self).__name__}: nodes are not on this machine")

    def monitor_state_files(self) -> dict[Path, str]:
        """Local files a monitor running elsewhere needs a copy of: local path -> path
        relative to that monitor's ``STRATO_HOME``. Default: none."""
        return {}

    def cleanup(self) -> None:
        """Remove what this provider keeps on this machine for the cluster, once it has no
        nodes (``down`` calls this last). Default: nothing kept."""
        return None


    def prepare(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Create one-time resources (key pair, security group, firewall) if missing.

        ``config`` is the whole cluster config as a dict; returns provider facts the
        launcher keeps (e.g. the key pair name and the private key path). Idempotent.
        """
        return {}

    def adopt_facts(self, facts: Mapping[str, Any]) -> None:
        """Use what an earlier ``prepare`` returned (in this or another process, e.g. the
        monitor on the head) without creating anything, so nodes created here get the
        same key and network settings as those ``up`` created. Default: nothing to adopt.
        """
        return None

    @abc.abstractmethod
    def create_nodes(self, spec: NodeTypeSpec, count: int, tags: Mapping[str, str], *,
                     zone: str | None = None, spot: bool | None = None) -> list[Node]:
        """Create ``count`` nodes of one type, tagged with ``tags`` plus the cluster tag.

        ``zone`` picks one of ``spec.zones`` (default: the first); ``spot`` overrides
        ``spec.spot`` (the autoscaler's on-demand fallback). Raises ``CapacityError``
        for any lack of capacity, whatever the cloud's wording.
        """

    @abc.abstractmethod
    def terminate_nodes(self, node_ids: Sequence[str]) -> None:
        """Terminate these nodes; ids already gone are ignored."""

    @abc.abstractmethod
    def list_nodes(self, tag_filters: Mapping[str, str] | None = None, *,
                   include_terminated: bool = False) -> list[Node]:
        """Nodes of this cluster matching every tag in ``tag_filters``, including the
        ones strato stopped (autostop with ``down: false``: ``down`` and ``status`` must
        see them; they are ``NodeState.STOPPED``).

        With ``include_terminated`` also nodes the cloud has terminated, or stopped on its
        own (a preempted spot VM), recently, so the autoscaler can see which were
        preempted.
        """

    def stop_nodes(self, node_ids: Sequence[str]) -> None:
        """Stop these nodes (only where ``can_stop_nodes``); ids already gone are ignored."""
        raise ProviderError(f"{type(self).__name__} cannot stop nodes")

    def start_nodes(self, node_ids: Sequence[str]) -> None:
        """Start stopped nodes again and wait until they run (only where ``can_stop_nodes``)."""
        raise ProviderError(f"{type(self).__name__} cannot start stopped nodes")

    @abc.abstractmethod
    def set_tags(self, node_id: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags on one node."""

    def ssh_address(self, node: Node) -> str:
        """Address the launcher connects to over SSH (tests remap it, see strato.ssh)."""
        return node.public_ip or node.private_ip or ""

    def internal_address(self, node: Node) -> str:
        """Address other cluster nodes use to reach this one."""
        return node.private_ip or node.public_ip or ""

    # ---------------------------------------------------------- instance types and prices
    #: the cloud whose rows of the instance catalogue price this provider's nodes
    #: (``aws``/``gcp``); None: nodes have no list price and types cannot be chosen by GPU
    catalog_cloud: str | None = None

    def catalog_region(self, zone: str | None = None) -> str | None:
        """The catalogue region of nodes launched in ``zone`` (default: the provider's)."""
        return self.provider_config.get("region")

    def instance_type_of(self, spec: NodeTypeSpec) -> str | None:
        """The instance (machine) type ``spec.node_config`` names, if any."""
        return None

    def accelerators_of(self, spec: NodeTypeSpec) -> tuple[str, int] | None:
        """GPUs attached by ``node_config`` beside the type (GCP ``guestAccelerators``)."""
        return None

    def with_instance_type(self, spec: NodeTypeSpec, instance_type: str,
                           accelerator: str | None = None,
                           accelerator_count: int = 0) -> NodeTypeSpec:
        """``spec`` launching ``instance_type`` (carrying ``accelerator_count`` x
        ``accelerator``), for node types that name GPUs instead of a type."""
        raise ProviderError(f"{type(self).__name__} cannot choose instance types")

    def zones_offering(self, instance_types: Sequence[str]) -> dict[str, list[str]] | None:
        """Instance type -> the zones of this region that offer it; None: unknown."""
        return None

    def spot_prices(self, instance_types: Sequence[str]) -> dict[tuple[str, str], float]:
        """Current spot price per hour of (instance type, zone), where the cloud says;
        empty where it does not (the catalogue's figure is used instead)."""
        return {}

    def runtime_resources(self, spec: NodeTypeSpec) -> dict[str, float]:
        """Resources a node of this type offers (CPU, GPU, memory, accelerator_type:X).

        Clouds fill what the config leaves out from the instance type; explicit
        ``spec.resources`` always win.
        """
        return dict(spec.resources)
