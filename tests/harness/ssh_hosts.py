"""Real sshd hosts in network namespaces: the SSH provider's and the launcher's test bed.

Each host is a network namespace behind one bridge (``10.200.K.1/24``, K picked per test
session so parallel sessions never clash) running sshd under
``unshare --uts --pid --ipc --mount --fork --mount-proc``: its own hostname
(``strato-hN``), PID table, IPC, ``/tmp``, ``/dev/shm``, ``/etc/hosts`` (every host's
name) and ``/etc/resolv.conf`` (no DNS), and no route beyond the test subnet: nothing
outside may be contacted. The rest of
the filesystem is shared, like NFS homes, so this machine's ``sys.executable`` (with
strato installed) runs on every host; sessions get ``PATH`` starting with its directory.

Host-private ``/tmp`` means files a test wants hosts to see go under ``shared_tmp_path``
(``/var/tmp``), not pytest's ``tmp_path``. Everything started over SSH lives in the
host's PID namespace, so :meth:`Host.restart` (or teardown) kills all of it by killing
the namespace's init. Nothing is ever killed by name.

Each host has its own ``authorized_keys`` (the network's key unless a test, such as the
GCE host pool, sets others: :meth:`Host.set_authorized_keys`).

Fixtures: ``ssh_host_network`` (session), ``ssh_hosts`` (session, 3 hosts),
``shared_tmp_path`` and ``ssh_address_map`` (per test).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOT = Path(__import__("strato").__file__).resolve().parents[1]  # what hosts import
INSTALL_SCRIPT = REPO / "scripts" / "install-system-deps.sh"
SSHD = "/usr/sbin/sshd"
WORK_ROOT = Path("/var/tmp")          # shared with the hosts (their /tmp is private)
WORKDIR_PREFIX = "strato-sshnet-"
NUM_HOSTS = 3
START_TIMEOUT = 15.0

# PID 1 of a host's PID namespace: private mounts and hostname, then sshd; reaps orphans
# (daemonised runtimes end up here); when it dies the kernel kills the whole namespace.
_INIT = r'''
import os, signal, socket, subprocess, sys
hostname, hosts_file, resolv_conf, config, log, source, park = sys.argv[1:8]
socket.sethostname(hostname)
if source:  # the strato source lives under /tmp: keep it visible under the private /tmp
    subprocess.run(["mount", "--bind", source, park], check=True)
for where in ("/tmp", "/dev/shm"):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", where], check=True)
if source:
    os.makedirs(source, exist_ok=True)
    subprocess.run(["mount", "--move", park, source], check=True)
subprocess.run(["mount", "--bind", hosts_file, "/etc/hosts"], check=True)
subprocess.run(["mount", "--bind", resolv_conf, "/etc/resolv.conf"], check=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", config, "-E", log])
while True:
    pid, _ = os.wait()
    if pid == sshd.pid:
        sys.exit("sshd exited")
'''

_SSHD_CONFIG = """\
ListenAddress {ip}:{port}
HostKey {host_key}
PidFile {dir}/sshd.pid
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxSessions 64
# SHLVL=1 (below): bash then skips ~/.bashrc for ssh commands, as on a clean server;
# this machine's root .bashrc (pyenv init) costs ~0.6 s per command.
MaxStartups 64:30:128
Subsystem sftp internal-sftp
SetEnv PATH={path} SHLVL=1
LogLevel INFO
"""


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _keypair(comment: str) -> tuple[bytes, bytes]:
    """A fresh ed25519 key pair: (OpenSSH private key, one-line public key)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    """One namespaced sshd host; connect as ``user@ip:port`` with ``key_path``."""

    name: str              # "h2"
    ip: str
    hostname: str          # what `hostname` prints on it: "strato-h2"
    netns: str
    key_path: str
    port: int = 22
    user: str = "root"
    pid: int = 0           # the unshare process (leader of the process group we kill)
    init_pid: int = 0      # PID 1 of the host's PID namespace, as seen from here
    _network: SSHHostNetwork | None = field(default=None, repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def target(self, name: str | None = None):
        """An ``SSHTarget`` for this host (the launcher's connection record)."""
        from strato.ssh import SSHTarget

        return SSHTarget(host=self.ip, port=self.port, user=self.user,
                         key_path=self.key_path, name=name or self.hostname)

    @property
    def authorized_keys(self) -> Path:
        """This host's own authorized_keys file (sshd reads it on every login)."""
        return self._net().host_dir(self) / "authorized_keys"

    def set_authorized_keys(self, text: str) -> None:
        """Accept exactly these public keys from now on (a GCE guest agent's job)."""
        _write(self.authorized_keys, text.strip() + "\n" if text.strip() else "", 0o644)

    def reset_authorized_keys(self) -> None:
        """Accept the test network's key again (the default every host starts with)."""
        self.set_authorized_keys(self._net().public_key)

    def link_down(self) -> None:
        """Partition the host: its interface goes down, connects to it time out."""
        _sh("ip", "-n", self.netns, "link", "set", "eth0", "down")

    def link_up(self) -> None:
        _sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", self.netns, "route", "replace", "unreachable", "default")

    def run_local(self, cmd: str, *, timeout: float = 30.0,
                  check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``bash -c cmd`` inside the host's namespaces (no SSH) for assertions.

        ``pkill`` here only sees the host's own processes.
        """
        argv = ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p",
                "bash", "-c", cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def new_host_key(self) -> None:
        """Give the host a fresh SSH host key and restart it: a reinstalled machine, or
        someone else answering at its address."""
        host_key, _ = _keypair(self.hostname)
        _write(self._net().host_dir(self) / "ssh_host_ed25519_key", host_key)
        self.restart()

    def host_public_key(self) -> str:
        """The host's current public key as ``type base64``."""
        from cryptography.hazmat.primitives import serialization as s

        pem = (self._net().host_dir(self) / "ssh_host_ed25519_key").read_bytes()
        key = s.load_ssh_private_key(pem, password=None)
        return key.public_key().public_bytes(s.Encoding.OpenSSH,
                                             s.PublicFormat.OpenSSH).decode()

    def restart(self) -> None:
        """Kill everything running on the host and start a fresh sshd (new /tmp too)."""
        self.stop()
        self._net()._start(self)

    def stop(self) -> None:
        """Kill the host's process group; its PID namespace and all in it die with init."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._proc = None
        self.init_pid = 0  # the old namespace's init may linger as a zombie; never reuse it

    def _net(self) -> SSHHostNetwork:
        assert self._network is not None
        return self._network


class SSHHostNetwork:
    """A bridge, its namespaced hosts and one client key authorised on all of them."""

    def __init__(self) -> None:
        self.hosts: list[Host] = []
        self.workdir: Path | None = None
        self.bridge = ""
        self.k = -1
        self._closed = False
        self._setup_subnet()
        assert self.workdir is not None
        self.key_path = str(self.workdir / "id_ed25519")
        private, public = _keypair("strato-test")
        self.public_key = public.decode()
        _write(Path(self.key_path), private)
        _write(self.workdir / "id_ed25519.pub", public, 0o644)
        self.extra_hosts: dict[str, str] = {}  # name -> address, see set_host_entry
        self.hosts_file = self.workdir / "etc_hosts"
        # No nameserver: lookups of unknown names fail at once instead of timing out.
        self.resolv_conf = self.workdir / "etc_resolv.conf"
        _write(self.resolv_conf, "# strato test host: no DNS, names come from /etc/hosts\n",
               0o644)
        self._write_hosts_file()
        atexit.register(self.close)

    @property
    def bridge_ip(self) -> str:
        """This machine's address as the hosts see it."""
        return f"10.200.{self.k}.1"

    def _setup_subnet(self) -> None:
        """Claim a free 10.200.K.0/24 and bridge; creating the bridge is the atomic claim."""
        used = _sh("ip", "-4", "-o", "addr").stdout + _sh("ip", "-4", "route").stdout
        start = os.getpid() % 250
        for i in range(250):
            k = (start + i) % 250
            if f"10.200.{k}." in used:
                continue
            bridge = f"strato-br{k}"
            if _sh("ip", "link", "add", bridge, "type", "bridge", check=False).returncode:
                continue
            self.k, self.bridge = k, bridge
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{k}-{os.getpid()}-",
                                                 dir=WORK_ROOT))
            _sh("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", bridge)
            _sh("ip", "link", "set", bridge, "up")
            return
        raise RuntimeError("no free 10.200.K.0/24 subnet for the SSH test hosts")

    def _write_hosts_file(self) -> None:
        # Rewritten in place: every host bind-mounts this very inode over /etc/hosts.
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost",
                 f"{self.bridge_ip} strato-gateway"]
        lines += [f"{h.ip} {h.hostname}" for h in self.hosts]
        lines += [f"{ip} {name}" for name, ip in sorted(self.extra_hosts.items())]
        with open(self.hosts_file, "w") as f:
            f.write("\n".join(lines) + "\n")

    def set_host_entry(self, name: str, ip: str | None) -> None:
        """Make ``name`` resolve to ``ip`` on every host (None: remove it again)."""
        if ip is None:
            self.extra_hosts.pop(name, None)
        else:
            self.extra_hosts[name] = ip
        self._write_hosts_file()

    def host_dir(self, host: Host) -> Path:
        assert self.workdir is not None
        return self.workdir / host.name

    def add_host(self) -> Host:
        """Create and start one more host (10.200.K.2, .3, ...); ready when it returns."""
        assert self.workdir is not None
        n = len(self.hosts) + 2
        host = Host(name=f"h{n}", ip=f"10.200.{self.k}.{n}", hostname=f"strato-h{n}",
                    netns=f"strato-{self.k}-h{n}", key_path=self.key_path, _network=self)
        hdir = self.workdir / host.name
        hdir.mkdir()
        veth = f"strato-v{self.k}-{n}"
        _sh("ip", "netns", "add", host.netns)
        self.hosts.append(host)  # from here on close() cleans it up
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
            "netns", host.netns)
        _sh("ip", "link", "set", veth, "master", self.bridge)
        _sh("ip", "link", "set", veth, "up")
        _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        _sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        # only the test subnet is reachable: anything else (a cloud metadata address such
        # as 169.254.169.254 that a spot watcher polls, a made-up instance IP) fails at
        # once inside the namespace instead of leaving through this machine
        _sh("ip", "-n", host.netns, "route", "add", "unreachable", "default")

        host_key, _ = _keypair(host.hostname)
        _write(hdir / "ssh_host_ed25519_key", host_key)
        path = ":".join([os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin",
                         "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        (hdir / "sshd_config").write_text(_SSHD_CONFIG.format(
            ip=host.ip, port=host.port, host_key=hdir / "ssh_host_ed25519_key", dir=hdir,
            authorized_keys=hdir / "authorized_keys", path=path))
        _write(hdir / "authorized_keys", self.public_key, 0o644)
        (hdir / "init.py").write_text(_INIT)
        self._write_hosts_file()
        self._start(host)
        return host

    @staticmethod
    def _source_mount(hdir: Path) -> list[str]:
        """The hosts run this machine's strato; when its source tree is under /tmp (a CI
        clone, say), the host's private /tmp would hide it, so init binds it back."""
        source = SOURCE_ROOT
        if source.parts[:2] != ("/", "tmp"):
            return ["", ""]
        park = hdir / "source"
        park.mkdir(exist_ok=True)
        return [str(source), str(park)]

    def _start(self, host: Host) -> None:
        """Start the host's namespaced init + sshd and wait until sshd sends its banner."""
        assert self.workdir is not None
        hdir = self.workdir / host.name
        Path("/run/sshd").mkdir(exist_ok=True)
        out = open(hdir / "init.log", "ab")  # noqa: SIM115 - inherited by the child
        host._proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns,
             "unshare", "--uts", "--pid", "--ipc", "--mount", "--fork", "--kill-child",
             "--mount-proc", sys.executable, "-I", str(hdir / "init.py"),
             host.hostname, str(self.hosts_file), str(self.resolv_conf),
             str(hdir / "sshd_config"),
             str(hdir / "sshd.log"), *self._source_mount(hdir)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        out.close()
        host.pid = host._proc.pid
        with open(self.workdir / "pids", "a") as f:
            f.write(f"{host.pid} {host.netns}\n")
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.01
        while time.monotonic() < deadline:
            if host._proc.poll() is not None:
                break
            if not host.init_pid or not _pid_alive(host.init_pid):
                host.init_pid = _first_child(host.pid)
            if host.init_pid and _ssh_banner(host.ip, host.port):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        logs = "".join(p.read_text(errors="replace")[-2000:]
                       for p in (hdir / "init.log", hdir / "sshd.log") if p.exists())
        host.stop()
        raise RuntimeError(f"sshd on {host.name} ({host.ip}) did not come up within "
                           f"{START_TIMEOUT:g}s:\n{logs}")

    def close(self) -> None:
        """Tear down: kill by pid, delete namespaces, bridge, veths, then the files."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            host.stop()
        for i, host in enumerate(self.hosts):
            _sh("ip", "netns", "del", host.netns, check=False)
            _sh("ip", "link", "del", f"strato-v{self.k}-{i + 2}", check=False)
        if self.bridge:
            _sh("ip", "link", "del", self.bridge, check=False)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _first_child(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0]) if children else 0
    return 0


def _ssh_banner(ip: str, port: int) -> bool:
    """True once something on ip:port speaks SSH (sshd is accepting logins)."""
    try:
        with socket.create_connection((ip, port), timeout=0.5) as s:
            s.settimeout(1.0)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def reap_stale_networks() -> None:
    """Remove host networks left by a test session that died without tearing down.

    Only when the owning pytest pid is gone, and only process groups recorded in that
    session's ``pids`` file whose command line still points into its work dir, are killed.
    """
    for workdir in WORK_ROOT.glob(f"{WORKDIR_PREFIX}*"):
        try:
            k_str, owner_str = workdir.name[len(WORKDIR_PREFIX):].split("-")[:2]
            k, owner = int(k_str), int(owner_str)
        except ValueError:
            continue
        if _pid_alive(owner):
            continue
        pids = workdir / "pids"
        for line in (pids.read_text().splitlines() if pids.exists() else []):
            pid = int(line.split()[0])
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if str(workdir) in cmdline:
                    os.killpg(pid, signal.SIGKILL)
        for ns in _sh("ip", "netns", "list", check=False).stdout.split():
            if ns.startswith(f"strato-{k}-h"):
                _sh("ip", "netns", "del", ns, check=False)
        for line in _sh("ip", "-o", "link", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"strato-v{k}-"):
                _sh("ip", "link", "del", name, check=False)
        _sh("ip", "link", "del", f"strato-br{k}", check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _ensure_prerequisites() -> None:
    """Skip off-root or without netns support; install missing packages (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("SSH host harness needs root (network namespaces, a bridge, sshd)")
    if not (os.path.exists(SSHD) and shutil.which("ip") and shutil.which("rsync")):
        res = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                             timeout=600)
        if res.returncode != 0 or not os.path.exists(SSHD) or not shutil.which("ip"):
            pytest.fail(f"{INSTALL_SCRIPT.name} could not install sshd/iproute2:\n"
                        f"{res.stdout}{res.stderr}")
    for tool in ("unshare", "nsenter"):
        if not shutil.which(tool):
            pytest.skip(f"SSH host harness needs {tool} (util-linux)")
    probe = f"strato-probe-{os.getpid()}"
    res = _sh("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        pytest.skip(f"`ip netns` unavailable here: {res.stderr.strip()}")
    _sh("ip", "netns", "del", probe, check=False)


@pytest.fixture(scope="session")
def ssh_host_network() -> Iterator[SSHHostNetwork]:
    """The bridge and key of this session's SSH hosts; ``add_host()`` makes more."""
    _ensure_prerequisites()
    reap_stale_networks()
    net = SSHHostNetwork()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="session")
def ssh_hosts(ssh_host_network: SSHHostNetwork) -> list[Host]:
    """Three running sshd hosts (h2, h3, h4), shared by every test of the session.

    Tests that start processes on them should ``restart()`` the hosts they used, or
    stop what they started, so later tests see idle hosts.
    """
    while len(ssh_host_network.hosts) < NUM_HOSTS:
        ssh_host_network.add_host()
    return ssh_host_network.hosts[:NUM_HOSTS]


# ------------------------------------------------------------------ what strato left on hosts
def _refresh_init_pid(host: Host) -> None:
    """Work around Host.restart() keeping a stale init_pid (its old init was still a zombie
    when the new one started), which makes run_local fail."""
    if host.init_pid and not Path(f"/proc/{host.init_pid}/ns/ipc").exists():
        host.init_pid = _first_child(host.pid)


def strato_processes(host: Host) -> str:
    """Command lines of strato processes on the host (its own PID namespace)."""
    _refresh_init_pid(host)
    res = host.run_local("ps -eo args", timeout=15)
    assert res.returncode == 0, res.stderr
    return "\n".join(line for line in res.stdout.splitlines()
                     if "strato.runtime" in line or "strato.launcher" in line)


def stop_strato(host: Host) -> None:
    """Stop what strato runs on a host the launcher could not clean (by pid, on the host)."""
    _refresh_init_pid(host)
    host.run_local(f"{sys.executable} -m strato.cli stop; pid=$(cat /tmp/strato-*/monitor/"
                   "monitor.pid 2>/dev/null) && kill $pid", timeout=30)


@pytest.fixture
def no_strato_left(ssh_hosts: list[Host]) -> Iterator[None]:
    """After the test (and its own cleanup): no strato process may remain on any running
    host. Checked at teardown, so a leak is reported beside the test's own result rather
    than masking it; whatever is found is stopped so later tests see idle hosts."""
    yield
    leftovers = {}
    for host in ssh_hosts:
        if not host.init_pid:  # a GCE-played host that was halted: nothing can run there
            continue
        found = strato_processes(host)
        if found:
            leftovers[host.name] = found
            stop_strato(host)
    assert not leftovers, f"strato processes left on test hosts: {leftovers}"


@pytest.fixture
def shared_tmp_path() -> Iterator[Path]:
    """A temp dir every SSH host sees at the same path (hosts' /tmp is private)."""
    path = Path(tempfile.mkdtemp(prefix="strato-test-", dir=WORK_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class AddressMap:
    """The JSON file behind ``STRATO_SSH_ADDRESS_MAP``: cloud address/id -> test host."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, str] = {}
        self._save()

    def add(self, address: str, host: Host | str) -> None:
        """Route connections for ``address`` (an IP or instance id) to ``host``."""
        self.entries[address] = f"{host.ip}:{host.port}" if isinstance(host, Host) else host
        self._save()

    def remove(self, address: str) -> None:
        """Forget ``address``: connections to it are refused again (strict map)."""
        if self.entries.pop(address, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)


@pytest.fixture
def ssh_address_map(monkeypatch: pytest.MonkeyPatch, shared_tmp_path: Path,
                    request: pytest.FixtureRequest) -> AddressMap:
    """A strict address map in the environment (inherited by subprocesses).

    Unmapped addresses are refused before any connection; when ``ssh_hosts`` is in use
    its hosts map to themselves, so on-prem tests keep working.
    """
    amap = AddressMap(shared_tmp_path / "ssh-address-map.json")
    if "ssh_hosts" in request.fixturenames:
        for host in request.getfixturevalue("ssh_hosts"):
            amap.add(host.ip, host)
    monkeypatch.setenv("STRATO_SSH_ADDRESS_MAP", str(amap.path))
    monkeypatch.setenv("STRATO_SSH_ADDRESS_MAP_STRICT", "1")
    return amap
