"""Starting and stopping this machine's runtime node processes: the one place that
spawns ``python -m strato.runtime.node`` (for `strato start`, and for ``strato.init()``
when it starts a node tied to its driver), and what `strato stop` calls."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

from strato.exceptions import StratoError
from strato.runtime import tls
from strato.runtime.session import ForeignDirError, ensure_private_dir, node_files, read_token


class StartError(StratoError, ConnectionError):
    """The node process could not start or join; the message says why.

    Also a ``ConnectionError``: ``strato.init()`` raised that when it could not bring up
    or join a cluster, and callers may still catch it so."""


@dataclass
class StartedNode:
    info: dict                     # the node file's content (see ``strato.runtime.node``)
    log_path: str
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return self.info["head_address"]

    @property
    def token(self) -> str:
        return read_token(self.info)

    @property
    def join_bundle(self) -> str | None:
        """The join bundle a head wrote (``strato start --address A --join-bundle F``)."""
        return self.info.get("join_bundle")


def start_node(*, head: bool, temp_dir: str, address: str | None = None, port: int | None = None,
               token: str | None = None, num_cpus: float | None = None,
               num_gpus: float | None = None, resources: str | None = None,
               labels: str | None = None, node_ip: str | None = None,
               object_store_memory: int | None = None, spot_notice: str | None = None,
               env: dict | None = None, parent_pid: int | None = None,
               join_bundle: str | None = None, timeout: float = 60.0) -> StartedNode:
    """Launch a node process and return once it is up (or raise StartError).

    With ``parent_pid`` the node stops when that process exits (a driver's own node).
    TLS credentials come from ``join_bundle`` (default ``$STRATO_JOIN_BUNDLE``; it also
    gives the address and token when they are not passed), or from ``$STRATO_TLS`` (JSON,
    how the launcher hands them over SSH), or are already in ``TEMP_DIR/tls``; a head
    without any makes a new cluster CA there.
    """
    temp_dir = os.path.abspath(temp_dir)
    try:
        ensure_private_dir(temp_dir)
    except ForeignDirError as exc:
        raise StartError(str(exc).removeprefix("strato: ")) from None
    os.makedirs(os.path.join(temp_dir, "logs"), exist_ok=True)
    if resources:
        try:
            parsed = json.loads(resources)
        except ValueError as exc:
            raise StartError(f"--resources must be a JSON object, e.g. '{{\"tpu\": 4}}': {exc}") from None
        if not isinstance(parsed, dict):
            raise StartError("--resources must be a JSON object, e.g. '{\"tpu\": 4}'")
        for k, v in parsed.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise StartError(f"--resources: {k!r} must be a number >= 0, got {v!r}")
    for name, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus)):
        if value is not None and value < 0:
            raise StartError(f"{name} must be >= 0, got {value}")
    _install_tls(temp_dir, env, head, join_bundle or os.environ.get("STRATO_JOIN_BUNDLE"))
    if not head and not address:
        address = _bundle_fields(join_bundle)[0]
    if not head and not token:
        token = _bundle_fields(join_bundle)[1]
    if not head and not address:
        raise StartError("pass --head to start a head node, or --address HEAD:PORT (or "
                         "--join-bundle FILE) to join one")
    fd, ready = tempfile.mkstemp(prefix="ready-", dir=temp_dir)
    os.close(fd)
    os.unlink(ready)
    cmd = [sys.executable, "-m", "strato.runtime.node", "--temp-dir", temp_dir, "--ready-file", ready]
    if head:
        cmd += ["--head", "--port", str(port if port is not None else 6380)]
    else:
        cmd += ["--address", address]
    for flag, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus),
                        ("--resources", resources), ("--labels", labels),
                        ("--node-ip", node_ip), ("--object-store-memory", object_store_memory),
                        ("--spot-notice", spot_notice), ("--parent-pid", parent_pid)):
        if value is not None:
            cmd += [flag, str(value)]
    env = {**os.environ, **(env or {})}
    for name in ("STRATO_TLS", "STRATO_JOIN_BUNDLE"):   # written to TEMP_DIR/tls above
        env.pop(name, None)
    if token:
        env["STRATO_TOKEN"] = token  # never on the command line, where `ps` shows it
    log_path = os.path.join(temp_dir, "logs", f"node-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise StartError(_failure_message(log_path, proc.returncode))
        if time.monotonic() > deadline:
            proc.kill()
            raise StartError(f"the node did not come up within {timeout:.0f}s; see {log_path}")
        time.sleep(0.02)
    with open(ready) as f:
        info = json.load(f)
    os.unlink(ready)
    return StartedNode(info, log_path, proc)


def _install_tls(temp_dir: str, env: dict | None, head: bool, join_bundle: str | None) -> None:
    """Put this node's TLS credentials in ``TEMP_DIR/tls`` (0600) from the launcher's
    ``STRATO_TLS`` or a join bundle; nothing to do when neither is given."""
    raw = (env or {}).get("STRATO_TLS") or os.environ.get("STRATO_TLS")
    try:
        if raw:
            creds = tls.Credentials.from_json(json.loads(raw))
        elif join_bundle and not head:
            creds = tls.read_join_bundle(join_bundle)[2]
        else:
            return
    except ValueError as exc:
        raise StartError(f"bad TLS credentials: {exc}") from None
    tls.save(os.path.join(temp_dir, "tls"), creds)


def _bundle_fields(join_bundle: str | None) -> tuple[str | None, str | None]:
    path = join_bundle or os.environ.get("STRATO_JOIN_BUNDLE")
    if not path:
        return None, None
    try:
        address, token, _ = tls.read_join_bundle(path)
    except ValueError as exc:
        raise StartError(str(exc)) from None
    return address, token


def _failure_message(log_path: str, code: int) -> str:
    with open(log_path, errors="replace") as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("strato:")]
    reason = lines[-1][len("strato:"):].strip() if lines else f"exit code {code}; see {log_path}"
    return reason


def stop_nodes(temp_dir: str, timeout: float = 10.0) -> int:
    """Stop every node process recorded under ``temp_dir`` (by pid); returns how many."""
    temp_dir = os.path.abspath(temp_dir)
    infos = node_files(temp_dir)
    procs = []
    for info in infos:
        try:
            proc = psutil.Process(info["pid"])
            children = proc.children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
            procs.extend(children)
        except psutil.NoSuchProcess:
            continue
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    # nodes that were killed (SIGKILL, OOM) could not clean up: their store and files go too
    for info in infos + node_files(temp_dir, dead=True):
        if info.get("shm_dir", "").startswith("/dev/shm/strato-"):
            shutil.rmtree(info["shm_dir"], ignore_errors=True)
        for path in (info.get("_file"), info.get("token_file")):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
    return len(infos)
