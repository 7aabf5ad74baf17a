"""GCE instances played by namespaced sshd hosts, with a guest agent's rules.

``GCEHostPool`` is the fake Compute API's ``machines``: when an instance is inserted it
takes a free test host and maps the instance to it in the strict SSH address map (the
fake's made-up addresses are never contacted); while the instance boots the host accepts
no key at all; once it is ``RUNNING`` the host accepts exactly the keys of its ``ssh-keys``
metadata (instance and project) for its user, as GCE's guest agent installs them; when
the instance is stopped its host is shut down (every process killed, no key accepted) but
kept for it, and a start boots that same host again (its disk, host key and mapping
survive; ``/tmp`` starts empty, as Ubuntu empties it at boot); when the instance is
deleted (or preempted) everything on the host is killed and the mapping removed. It also serves the metadata server's ``instance/preempted`` on the test bridge
(``metadata.google.internal`` resolves there on every host), answering per host.

Fixtures: ``gce_host_pool`` (the bridge fake's VMs played by ``ssh_hosts``), ``gce_hosts`` (the per-test fake on loopback, played by ``ssh_hosts``) and
``gce_bridge_fake`` (a fake served on the hosts' bridge, for a monitor that runs on a
namespaced head).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # harness modules are plugins: import them at run time only
    from tests.harness.gce_fake import GCEFake
    from tests.harness.ssh_hosts import AddressMap, Host, SSHHostNetwork

METADATA_NAME = "metadata.google.internal"


class GCEHostPool:
    """Plays the fake's instances on ``hosts`` (one instance per host at a time)."""

    def __init__(self, fake: GCEFake, network: SSHHostNetwork, hosts: Sequence[Host],
                 address_map: AddressMap, *, user: str = "root") -> None:
        self.fake = fake
        self.network = network
        self.hosts = list(hosts)
        self.address_map = address_map
        self.user = user
        self._lock = threading.Lock()
        self.free = list(hosts)
        self.by_name: dict[str, Host] = {}
        self.history: list[tuple[str, str, str]] = []   # (event, instance, host name)
        self._dirty: set[str] = set()                   # hosts that must start afresh
        for host in self.hosts:
            host.set_authorized_keys("")  # a machine with no instance on it lets no one in
        self._metadata = _metadata_server(self, network.bridge_ip)
        network.set_host_entry(METADATA_NAME, network.bridge_ip)
        fake.machines = self

    # -- the fake's hooks
    def created(self, name: str) -> None:
        with self._lock:
            if not self.free:
                raise RuntimeError(f"GCEHostPool: no free test host for instance {name}")
            host = self.free.pop(0)
            self.by_name[name] = host
            fresh = host.name in self._dirty
            self._dirty.discard(host.name)
            self.history.append(("created", name, host.name))
        if fresh:
            host.restart()  # a new VM: nothing of the previous one survives
        self.address_map.add(name, host)

    def booted(self, name: str, ssh_keys: str) -> None:
        host = self.by_name.get(name)
        if host is None:
            return
        keys = []
        for line in ssh_keys.splitlines():
            user, _, key = line.strip().partition(":")
            if user == self.user and key.strip():
                keys.append(key.strip())
        host.set_authorized_keys("\n".join(keys))
        with self._lock:
            self.history.append(("booted", name, host.name))

    def stopped(self, name: str) -> None:
        """Shut the machine down but keep it for the instance (a stopped VM's disk)."""
        host = self.by_name.get(name)
        if host is None:
            return
        with self._lock:
            self.history.append(("stopped", name, host.name))
        host.stop()
        host.set_authorized_keys("")

    def started(self, name: str) -> None:
        """Boot the instance's own machine again (``booted`` then installs the keys)."""
        host = self.by_name.get(name)
        if host is None:  # preempted to TERMINATED: its machine was handed back
            self.created(name)  # a fresh one, running, accepting no key yet
            return
        with self._lock:
            self.history.append(("started", name, host.name))
        host.set_authorized_keys("")
        host.restart()

    def preempted(self, name: str) -> None:
        host = self.by_name.get(name)
        with self._lock:
            self.history.append(("preempted", name, host.name if host else ""))

    def halted(self, name: str) -> None:
        with self._lock:
            host = self.by_name.pop(name, None)
            if host is None:
                return
            self.history.append(("halted", name, host.name))
        host.stop()
        host.set_authorized_keys("")
        self.address_map.remove(name)
        with self._lock:
            self._dirty.add(host.name)
            self.free.append(host)

    # -- views
    def host_of(self, name: str) -> Host | None:
        return self.by_name.get(name)

    def instance_on(self, ip: str) -> str | None:
        return next((n for n, h in list(self.by_name.items()) if h.ip == ip), None)

    def close(self) -> None:
        """Hand the hosts back as the other tests expect them: running, network key."""
        self.fake.machines = None
        with contextlib.suppress(Exception):
            self._metadata.shutdown()
            self._metadata.server_close()
        self.network.set_host_entry(METADATA_NAME, None)
        for name in list(self.by_name):
            self.address_map.remove(name)
        for host in self.hosts:
            host.reset_authorized_keys()
            if host.name in self._dirty or host.init_pid == 0:
                host.restart()


def _metadata_server(pool: GCEHostPool, ip: str) -> ThreadingHTTPServer:
    """``GET /computeMetadata/v1/instance/preempted`` on ip:80, answered per calling host."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            name = pool.instance_on(self.client_address[0])
            if self.headers.get("Metadata-Flavor") != "Google" or name is None:
                status, body = 403, b""
            elif self.path.split("?")[0] == "/computeMetadata/v1/instance/preempted":
                status, body = 200, b"TRUE" if pool.fake.is_preempted(name) else b"FALSE"
            else:
                status, body = 404, b""
            self.send_response(status)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((ip, 80), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gce-metadata", daemon=True).start()
    return server


@pytest.fixture
def gce_hosts(gce_fake: GCEFake, ssh_host_network: SSHHostNetwork, ssh_hosts: list[Host],
              ssh_address_map: AddressMap) -> Iterator[GCEHostPool]:
    """The loopback GCE fake's instances played by the session's SSH hosts."""
    for host in ssh_hosts:
        ssh_address_map.remove(host.ip)  # reach them only as instances, by their names
    pool = GCEHostPool(gce_fake, ssh_host_network, ssh_hosts, ssh_address_map)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def gce_bridge_fake(ssh_host_network: SSHHostNetwork) -> Iterator[GCEFake]:
    """A fake Compute API served on the hosts' bridge (a head's monitor can reach it)."""
    from tests.harness.gce_fake import GCEFake

    fake = GCEFake().start(host=ssh_host_network.bridge_ip)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def gce_host_pool(gce_bridge_fake: GCEFake, ssh_host_network: SSHHostNetwork,
                  ssh_hosts: list[Host], ssh_address_map: AddressMap) -> Iterator[GCEHostPool]:
    """The bridge fake's VMs played by the test hosts (whose own addresses are unmapped:
    only instances are reachable, as on GCE)."""
    for host in ssh_hosts:
        ssh_address_map.remove(host.ip)
    pool = GCEHostPool(gce_bridge_fake, ssh_host_network, ssh_hosts, ssh_address_map)
    try:
        yield pool
    finally:
        pool.close()

