"""Turning a fresh machine into a cluster node: SSH, file mounts, setup, strato, runtime.

Shell scripts come from ``strato/templates/*.sh`` (``{{ key }}`` slots filled with
already-quoted shell words), never from strings built here. A failing command raises
``CommandError`` (node, command, exit code, output tail) after the node is tagged
``update-failed``, so the next ``strato up`` retries it.

Getting strato onto a node: with ``runtime_python`` configured that Python is used as is.
Otherwise the launcher builds a wheel of the strato it runs, once per version and source
digest (``$STRATO_HOME/wheels/``), uploads it and installs it into
``~/.strato/venv-<version>`` on the node under ``flock``, so nodes sharing one home
directory (NFS) install once and safely.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import json
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from strato.exceptions import LauncherError
from strato.launcher.runner import CommandRunner, shell_path
from strato.localfiles import file_lock, strato_home
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_NODE_TYPE,
    TAG_SETUP_HASH,
    TAG_STATUS,
    Node,
    NodeKind,
    NodeStatus,
)
from strato.runtime import tls
from strato.ssh import resolve_address

if TYPE_CHECKING:
    from strato.launcher.cluster import Cluster

__all__ = ["TAG_NODE_ID_LABEL", "bootstrap_node", "ensure_wheel", "install_strato", "render", "start_runtime",
           "venv_dir", "version_tag"]

TAG_NODE_ID_LABEL = "strato-node-id"  # runtime label matching a runtime node to its machine
SSH_TIMEOUT = 300.0          # a cloud machine may take minutes to accept SSH
START_TIMEOUT = 120.0        # `strato start` itself waits up to 60 s for the node
INSTALL_LOCK_TIMEOUT = 900   # another node installing the same venv over NFS
_wheel_lock = threading.Lock()


# ---------------------------------------------------------------- templates
class _ScriptTemplate(string.Template):
    """``{{ key }}`` slots only, so the scripts' own ``$vars`` need no escaping."""

    delimiter = "{{"
    pattern = r"""\{\{\s*(?:(?P<named>[a-z_][a-z0-9_]*)\s*\}\}|(?P<braced>(?!))|(?P<escaped>(?!))|(?P<invalid>))"""


def render(name: str, **values: str) -> str:
    """The template ``strato/templates/<name>`` with every slot filled (KeyError if not)."""
    text = importlib.resources.files("strato.templates").joinpath(name).read_text()
    return _ScriptTemplate(text).substitute(values)


# ---------------------------------------------------------------- the strato wheel
def source_root() -> Path | None:
    """The source tree of the running strato (pyproject beside the package), if any."""
    import strato

    root = Path(strato.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def version_tag() -> str:
    """strato's version, plus a digest of its sources when running from a checkout (so an
    edited checkout gets a fresh wheel and venv)."""
    version = importlib.metadata.version("strato")
    root = source_root()
    if root is None:
        return version
    h = hashlib.sha1(usedforsecurity=False)
    h.update((root / "pyproject.toml").read_bytes())
    for path in sorted((root / "strato").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"{version}-{h.hexdigest()[:10]}"


def venv_dir(tag: str | None = None) -> str:
    """Where nodes get their strato venv: ``~/.strato/venv-<version>``."""
    return f"~/.strato/venv-{tag or version_tag()}"


def _can_build_in_place() -> bool:
    """Whether this Python can build strato's wheel without pip's isolated build env:
    setuptools >= 68 (pyproject's floor) and a bdist_wheel (the ``wheel`` package, or
    setuptools >= 70.1 which ships its own). A fresh ``python -m venv`` has neither, so
    pip then builds in isolation, fetching them from the package index."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < (68, 0):
        return False
    try:
        importlib.metadata.version("wheel")
        return True
    except importlib.metadata.PackageNotFoundError:
        return parts >= (70, 1)


def ensure_wheel(tag: str | None = None) -> Path:
    """A wheel of the running strato, built once per version tag and reused."""
    tag = tag or version_tag()
    out = strato_home() / "wheels" / tag
    with _wheel_lock, file_lock(out.with_suffix(".lock")):
        wheels = sorted(out.glob("strato-*.whl"))
        if wheels:
            return wheels[0]
        root = source_root()
        if root is None:
            raise LauncherError(
                "cannot build a strato wheel: this strato is not a source checkout; set "
                "runtime_python in the cluster config to a Python that has strato installed")
        with tempfile.TemporaryDirectory(prefix="strato-wheel-") as tmp:
            # build from a copy: an in-tree build leaves build/ (and stale files) behind
            src = Path(tmp) / "src"
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            src.mkdir()
            for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg"):
                if (root / name).is_file():
                    shutil.copy2(root / name, src / name)
            shutil.copytree(root / "strato", src / "strato", ignore=ignore)
            isolation = ["--no-build-isolation"] if _can_build_in_place() else []
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation,
                 "--disable-pip-version-check", "-q", "-w", tmp],
                capture_output=True, text=True, timeout=600)
            built = sorted(Path(tmp).glob("strato-*.whl"))
            if proc.returncode != 0 or not built:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
                raise LauncherError(f"building the strato wheel failed (exit "
                                    f"{proc.returncode}):\n{tail}")
            out.mkdir(parents=True, exist_ok=True)
            final = out / built[0].name
            shutil.move(built[0], final)
        return final


def install_strato(runner: CommandRunner, wheel: Path, *, venv: str, scratch: str,
                   base_python: str = "python3", pip_args: str = "",
                   venv_args: str = "") -> None:
    """Upload ``wheel`` and install it (with its dependencies) into ``venv`` on the node."""
    remote_wheel = f"{scratch}/wheels/{wheel.name}"
    runner.put(wheel, remote_wheel)
    script = render("install_strato.sh", version=shlex.quote(wheel.name), venv=shell_path(venv),
                    lock_timeout=str(INSTALL_LOCK_TIMEOUT), base_python=base_python,
                    venv_args=venv_args, pip_args=pip_args, wheel=shell_path(remote_wheel))
    runner.run(script, timeout=INSTALL_LOCK_TIMEOUT + 600)


# ---------------------------------------------------------------- the runtime
def start_args(cluster: Cluster, node: Node, head_address: str | None) -> list[str]:
    """``strato start`` arguments: head or join, address, resources, matching labels."""
    node_type = node.node_type or cluster.config.head_node_type
    is_head = node.kind == NodeKind.HEAD.value
    args = ["--head", "--port", str(cluster.head_port)] if is_head else \
        ["--address", head_address or ""]
    if cluster.is_local:
        node_ip = "127.0.0.1"
    else:  # the address map (tests) keeps runtime traffic off made-up cloud addresses too
        node_ip = resolve_address(cluster.provider.internal_address(node), node.id)[0]
    args += ["--node-ip", node_ip]
    resources = dict(cluster.provider.runtime_resources(cluster.config.node_type_spec(node_type)))
    if "CPU" in resources:
        args += ["--num-cpus", f"{resources.pop('CPU'):g}"]
    if "GPU" in resources:
        args += ["--num-gpus", f"{resources.pop('GPU'):g}"]
    if resources:
        args += ["--resources", json.dumps(resources, sort_keys=True)]
    notice = cluster.provider.spot_notice
    if node.spot and notice:
        # the node agent watches the cloud's notice so the head drains it before reclaim
        args += ["--spot-notice", notice]
    labels = {TAG_CLUSTER: cluster.name, TAG_KIND: node.kind or "", TAG_NODE_TYPE: node_type,
              TAG_NODE_ID_LABEL: node.id}
    return [*args, "--labels", json.dumps(labels, sort_keys=True)]


def node_credentials(cluster: Cluster, node: Node) -> str:
    """``node``'s TLS credentials as JSON (``STRATO_TLS``; travels over SSH like the
    token): a certificate from the cluster CA, and for the head the CA key too, so that
    it can write a join bundle and the monitor beside it can issue certificates."""
    ca_key, ca_cert = cluster.state.ensure_ca(cluster.name)
    creds = tls.issue(ca_key, ca_cert, f"strato {node.kind or 'node'} {node.id}")
    if node.kind == NodeKind.HEAD.value:
        creds = tls.Credentials(creds.ca_cert, creds.cert, creds.key, ca_key)
    return json.dumps(creds.to_json(with_ca_key=True))


def start_runtime(cluster: Cluster, node: Node, runner: CommandRunner, *,
                  head_address: str | None) -> str | None:
    """(Re)start the runtime on ``node``; returns the head's address for the head."""
    if not cluster.token:
        raise LauncherError(f"cluster {cluster.name!r}: no token to start the runtime with")
    args = [*start_args(cluster, node, head_address), "--json"]  # the node file, last line
    script = render("start_node.sh", python=cluster.runtime_python(node.node_type or ""),
                    temp_dir=cluster.temp_dir(node),
                    start_args=" ".join(shlex.quote(a) for a in args))
    # quiet: `strato start`'s own lines (join instructions, the node file as JSON) are for
    # a person at that machine; the log keeps them, the terminal gets one line below
    _, tail = runner.run(script, env={"STRATO_TOKEN": cluster.token,
                                      "STRATO_TLS": node_credentials(cluster, node)},
                         timeout=START_TIMEOUT, quiet=True)
    info: dict = {}
    for line in reversed(tail.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                info = json.loads(line)
                break
    if not isinstance(info, dict) or not info.get("head_address"):
        raise LauncherError(f"node {runner.name}: `strato start --json` did not report its "
                            f"node; output:\n{tail}")
    is_head = node.kind == NodeKind.HEAD.value
    short = str(info.get("node_id", ""))[:8]
    where = (f"strato head {short} listening at {info['head_address']}" if is_head
             else f"strato node {short} joined {info['head_address']}")
    runner.sink.line(f"{where} with {_describe_resources(info.get('resources') or {})}")
    return info["head_address"] if node.kind == NodeKind.HEAD.value else None


def _describe_resources(resources: dict) -> str:
    """``CPU 4, GPU 1, memory 15.0 GiB``: a node's resources as a person reads them."""
    parts = []
    for name, amount in resources.items():
        if name == "memory":
            parts.append(f"memory {float(amount) / 2**30:.1f} GiB")
        else:
            parts.append(f"{name} {float(amount):g}")
    return ", ".join(parts) or "no resources"


# ---------------------------------------------------------------- one node
def bootstrap_node(cluster: Cluster, node: Node, *, head_address: str | None,
                   setup: bool = True, restart: bool = True) -> str | None:
    """Bring ``node`` up to date: setup (when ``setup``) then runtime (when ``restart``).

    Returns the head address when ``node`` is the head and its runtime was started.
    """
    is_head = node.kind == NodeKind.HEAD.value
    node_type = node.node_type or cluster.config.head_node_type
    runner = cluster.runner(node)
    provider = cluster.provider
    address = None
    if setup:
        provider.set_tags(node.id, {TAG_STATUS: NodeStatus.SETTING_UP.value})
    try:
        runner.wait_ready(SSH_TIMEOUT if not cluster.is_local else 0)
        if setup:
            _run_setup(cluster, node, runner, node_type, is_head)
        if restart:
            address = start_runtime(cluster, node, runner, head_address=head_address)
    except Exception as e:
        with contextlib.suppress(Exception):
            provider.set_tags(node.id, {TAG_STATUS: NodeStatus.UPDATE_FAILED.value})
        cluster.state.add_event(cluster.name, f"update failed: {str(e).splitlines()[0]}",
                                node=node.id)
        raise
    tags = {TAG_STATUS: NodeStatus.UP_TO_DATE.value}
    if setup:
        tags[TAG_SETUP_HASH] = cluster.setup_hash(node_type, head=is_head)
    provider.set_tags(node.id, tags)
    return address


def _run_setup(cluster: Cluster, node: Node, runner: CommandRunner, node_type: str,
               is_head: bool) -> None:
    config = cluster.config
    copy_filter = config.copy_filter()  # rsync_exclude / rsync_filter
    for remote, local in config.file_mounts.items():
        runner.put(local, remote, copy_filter=copy_filter)
    for cmd in config.initialization_commands:
        runner.run(cmd)
    if not config.runtime_python_for(node_type) and not cluster.is_local:
        wheel = Path(cluster.overrides["wheel"]) if cluster.overrides.get("wheel") \
            else ensure_wheel()
        install_strato(runner, wheel, venv=cluster.overrides.get("venv") or venv_dir(),
                       scratch=cluster.scratch_dir(node))
    for cmd in (config.head_setup() if is_head else config.worker_setup(node_type)):
        runner.run(cmd)
