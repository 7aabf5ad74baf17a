"""The launcher with the local provider: nodes are runtime processes on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from strato.exceptions import LauncherError
from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from strato.providers.base import TAG_STATUS
from strato.providers.local import LocalProvider
from strato.runtime.session import node_files

pytestmark = pytest.mark.timeout(120)


def _config(path: Path, name: str, **extra) -> Path:
    data = {
        "cluster_name": name,
        "provider": {"type": "local"},
        "autoscaler": {"tick_seconds": 0.5},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}},
            "cpu": {"resources": {"CPU": 1, "w": 1}, "min_workers": 2, "max_workers": 3},
        },
        "head_node_type": "head",
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _cluster_pids(name: str) -> set[int]:
    """Every process of the cluster: node processes, their workers, the monitor."""
    provider = LocalProvider({"type": "local"}, name)
    pids = set()
    for node in provider.list_nodes():
        for info in node_files(str(provider.local_dir(node.id))):
            proc = psutil.Process(info["pid"])
            pids |= {proc.pid} | {c.pid for c in proc.children(recursive=True)}
    pid_file = Path(os.environ["STRATO_HOME"], "monitor", name, "monitor.pid")
    if pid_file.exists():
        pids.add(int(pid_file.read_text()))
    return pids


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import strato

    strato.init(address="auto")
    labels = {n["NodeID"]: n["Labels"].get("strato-node-id") for n in strato.nodes()}

    @strato.remote(resources={"w": 1})
    def where():
        time.sleep(0.3)
        return strato.get_runtime_context().get_node_id()

    seen = strato.get([where.remote() for _ in range(6)], timeout=60)
    with open(sys.argv[1], "w") as f:
        json.dump({"nodes": sorted({labels[s] for s in seen}), "args": sys.argv[2:]}, f)
    print("ran on", sorted({labels[s] for s in seen}))
""")


@dataclass
class LocalCluster:
    """One `up` shared by the phase tests below, so one failing phase hides no other."""

    config: Path
    home: Path
    tmp: Path
    head_address: str
    created: list[str]
    workers: list[str]
    pids: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def loc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("loc")
    home = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))  # short: unix socket paths
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATO_HOME", str(home))
        config = _config(tmp / "local.yaml", "loc")
        try:
            result = reconcile.up(config, yes=True)
            head_id = LocalProvider({}, "loc").list_nodes({"strato-node-kind": "head"})[0].id
            yield LocalCluster(config, home, tmp, result.head_address, list(result.created),
                               [i for i in result.created if i != head_id])
        finally:
            if StateDB().get("loc") is not None:
                reconcile.down(config, yes=True)
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def in_loc(loc: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    monkeypatch.setenv("STRATO_HOME", str(loc.home))
    return loc


def test_up_creates_head_and_min_workers_and_is_idempotent(in_loc):
    assert len(in_loc.created) == 3 and len(in_loc.workers) == 2
    assert reconcile.up(in_loc.config, yes=True).created == []


def test_exec_runs_everywhere_and_propagates_exit_codes(in_loc):
    out = in_loc.tmp / "exec.txt"
    assert commands.exec_(in_loc.config, f"echo $STRATO_ADDRESS >> {out}", node="all") == 0
    assert out.read_text().split() == [in_loc.head_address] * 3
    assert commands.exec_(in_loc.config, "exit 5") == 5
    # the cluster's join secret never reaches user commands (init() uses the node's socket)
    token = in_loc.tmp / "token.txt"
    assert commands.exec_(in_loc.config, f'echo "${{STRATO_TOKEN:-none}}" >> {token}',
                          node="all") == 0
    assert token.read_text().split() == ["none"] * 3


def test_submit_runs_the_script_on_the_workers(in_loc):
    script = in_loc.tmp / "job.py"
    script.write_text(SCRIPT)
    res = in_loc.tmp / "res.json"
    assert commands.submit(in_loc.config, script, [str(res), "--lr", "3e-4"]) == 0
    ran = json.loads(res.read_text())
    assert ran == {"nodes": sorted(in_loc.workers), "args": ["--lr", "3e-4"]}


def test_status_shows_every_node_alive(in_loc):
    info = commands.status(in_loc.config)
    assert sorted(n["id"] for n in info["nodes"]) == sorted(in_loc.created)
    assert all(n["state"] == "running" and n["runtime"] == "alive" and n["ip"] == "127.0.0.1"
               for n in info["nodes"])
    assert info["runtime"]["nodes_alive"] == 3


def test_monitor_replaces_a_worker_whose_process_died(in_loc):
    in_loc.pids |= _cluster_pids("loc")
    victim = in_loc.workers[0]
    victim_dir = LocalProvider({}, "loc").local_dir(victim)
    os.kill(node_files(str(victim_dir))[0]["pid"], signal.SIGKILL)
    _wait(lambda: victim not in {n.id for n in LocalProvider({}, "loc").list_nodes()}
          and sum(n["runtime"] == "alive" for n in commands.status(in_loc.config)["nodes"])
          == 3, 30, "the monitor to replace the killed worker")


def test_every_node_links_with_a_certificate_from_the_cluster_ca(in_loc):
    """The CA made at the first up (in STRATO_HOME, 0600) signed every node's certificate,
    the monitor's replacement worker's too; only the head holds the CA key."""
    from cryptography import x509

    key_path, cert_path = StateDB().ca_paths("loc")
    assert key_path.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    nodes = LocalProvider({}, "loc").list_nodes()
    assert len(nodes) == 3
    for node in nodes:
        info = node_files(str(LocalProvider({}, "loc").local_dir(node.id)))[0]
        tls_dir = Path(info["tls_dir"])
        assert (tls_dir / "ca.crt").read_bytes() == cert_path.read_bytes()
        x509.load_pem_x509_certificate((tls_dir / "node.crt").read_bytes()) \
            .verify_directly_issued_by(ca)
        assert (tls_dir / "ca.key").exists() == info["head"]
        assert all((tls_dir / n).stat().st_mode & 0o777 == 0o600 for n in os.listdir(tls_dir))


def test_down_stops_every_process_and_forgets_the_cluster(in_loc):
    """Last of the phases above (pytest runs a module's tests in order)."""
    pids = in_loc.pids | _cluster_pids("loc")
    reconcile.down(in_loc.config, yes=True)
    _wait(lambda: not [p for p in pids if psutil.pid_exists(p)
                       and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
          15, "every cluster process to exit")
    assert StateDB().get("loc") is None
    assert not (in_loc.home / "local" / "loc").exists()
    assert not (in_loc.home / "logs" / "loc").exists()
    assert not StateDB().token_path("loc").exists()
    assert not any(p.exists() for p in StateDB().ca_paths("loc"))


def test_setup_failure_is_retried_and_changes_are_applied(tmp_path, short_strato_home):
    marker = tmp_path / "fail"
    marker.touch()
    # the autoscaler would retry failed setups on its own (tested elsewhere); here it is
    # off so the tags reflect only what `up` did
    config = _config(tmp_path / "c.yaml", "retry",
                     provider={"type": "local", "monitor": "off"},
                     worker_setup_commands=[f"echo checking; test ! -e {marker}"])
    with pytest.raises(LauncherError) as info:
        reconcile.up(config, yes=True)
    assert "exit 1" in str(info.value) and str(marker) in str(info.value)
    provider = LocalProvider({}, "retry")
    workers = provider.list_nodes({"strato-node-kind": "worker"})
    assert [n.tags[TAG_STATUS] for n in workers] == ["update-failed"] * 2

    marker.unlink()  # fixed: the next `up` retries the failed nodes, creating nothing
    again = reconcile.up(config, yes=True)
    assert again.created == [] and sorted(again.bootstrapped) == sorted(n.id for n in workers)
    assert {n.tags[TAG_STATUS] for n in provider.list_nodes()} == {"up-to-date"}

    # changed setup: setup runs again on the workers (the head's setup did not change)
    data = yaml.safe_load(config.read_text())
    data["worker_setup_commands"] = ["echo new setup"]
    config.write_text(yaml.safe_dump(data))
    changed = reconcile.up(config, yes=True)
    assert changed.created == [] and sorted(changed.bootstrapped) == sorted(n.id for n in workers)
    assert "new setup" in commands.logs(config, node=workers[0].id)

    # changed node_config: the head is replaced, workers rejoin the new head
    old_head = provider.list_nodes({"strato-node-kind": "head"})[0].id
    data["available_node_types"]["head"]["node_config"] = {"flavour": "b"}
    config.write_text(yaml.safe_dump(data))
    replaced = reconcile.up(config, yes=True)
    assert replaced.terminated == [old_head] and len(replaced.created) == 1
    status = commands.status(config)
    assert len(status["nodes"]) == 3 and all(n["runtime"] == "alive" for n in status["nodes"])

    reconcile.down(config, yes=True)
    assert provider.list_nodes() == []


def test_min_workers_override_and_workers_only_down(tmp_path, short_strato_home):
    config = _config(tmp_path / "c.yaml", "few")
    data = yaml.safe_load(config.read_text())
    data["provider"]["monitor"] = "off"
    config.write_text(yaml.safe_dump(data))
    result = reconcile.up(config, yes=True, min_workers_override=1)
    assert len(result.created) == 2
    assert not (short_strato_home / "monitor" / "few" / "monitor.pid").exists()
    reconcile.down(config, yes=True, workers_only=True)
    nodes = LocalProvider({}, "few").list_nodes()
    assert [n.kind for n in nodes] == ["head"] and StateDB().get("few") is not None
    reconcile.down(config, yes=True)
    assert StateDB().get("few") is None and LocalProvider({}, "few").list_nodes() == []


def test_file_mounts_and_setup_commands_reach_every_node(tmp_path, short_strato_home):
    """file_mounts are copied before initialization/setup commands run, on head and workers."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("mounted-content\n")
    mount = tmp_path / "mounted"
    marks = tmp_path / "marks"
    marks.mkdir()
    config = _config(
        tmp_path / "fm.yaml", "fm",
        file_mounts={str(mount): str(source)},
        initialization_commands=[f"test -f {mount}/data.txt"],
        setup_commands=[f"cat {mount}/data.txt > {marks}/$RANDOM$RANDOM"],
    )
    reconcile.up(config, yes=True, min_workers_override=1)
    try:
        assert (mount / "data.txt").read_text() == "mounted-content\n"
        seen = [p.read_text() for p in marks.iterdir()]
        assert seen == ["mounted-content\n"] * 2  # the head and one worker
    finally:
        reconcile.down(config, yes=True)
