"""Real strato runtime clusters on this machine, as pytest fixtures.

- ``strato_local`` (module) / ``strato_local_fn`` (function, with a factory for custom
  ``init`` arguments): the embedded default, ``strato.init(num_cpus=2, temp_dir=...)``.
- ``multinode`` (module) / ``multinode_fn`` (function, for tests that kill nodes): a head
  (1 CPU) and two node agents (1 CPU each, custom resources ``node_b`` / ``node_c``)
  started with ``strato.runtime.control.start_node``; the driver joins with
  ``strato.init(address="auto", temp_dir=<head dir>)``.

Every fixture stops the processes it started (by pid) and removes its temp dirs and the
nodes' shared-memory directories, even after a node was killed with SIGKILL.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil
import pytest

HEARTBEAT_TIMEOUT_S = "2"


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _remove_shm_dirs(pids: list[int]) -> None:
    for pid in pids:
        for path in glob.glob(f"/dev/shm/strato-{pid}-*"):
            shutil.rmtree(path, ignore_errors=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (a machine that lost power)."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


# ------------------------------------------------------------------ single node
@dataclass
class _LocalSession:
    temp_dirs: list[str] = field(default_factory=list)
    node_pids: list[int] = field(default_factory=list)

    def start(self, **init_kwargs):
        import strato
        from strato.runtime import api

        if strato.is_initialized():
            strato.shutdown()
        temp_dir = tempfile.mkdtemp(prefix="strato-test-")
        self.temp_dirs.append(temp_dir)
        init_kwargs.setdefault("num_cpus", 2)
        strato.init(temp_dir=temp_dir, **init_kwargs)
        proc = api._state.get("node_proc")
        if proc is not None:
            self.node_pids.append(proc.pid)
        return strato

    def close(self) -> None:
        import strato

        if strato.is_initialized():
            strato.shutdown()
        for pid in self.node_pids:
            _kill_tree(pid)  # no-op when shutdown already stopped it
        _remove_shm_dirs(self.node_pids)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def strato_local() -> Iterator:
    """``strato.init(num_cpus=2)`` for the whole module; yields the ``strato`` module."""
    session = _LocalSession()
    try:
        yield session.start()
    finally:
        session.close()


@pytest.fixture
def strato_local_fn() -> Iterator[Callable]:
    """A factory: ``strato = strato_local_fn(num_cpus=.., resources=..)`` starts a fresh
    embedded cluster for this test only (shut down and cleaned up afterwards)."""
    import strato

    if strato.is_initialized():
        strato.shutdown()  # a module-scoped session may be live; tests get a clean runtime
    session = _LocalSession()
    try:
        yield session.start
    finally:
        session.close()


# ------------------------------------------------------------------ multi node
@dataclass
class MultiNode:
    """A head and two node agents; ``nodes`` maps "A"/"B"/"C" to their StartedNode."""

    nodes: dict
    dirs: dict

    @property
    def address(self) -> str:
        return self.nodes["A"].address

    @property
    def token(self) -> str:
        return self.nodes["A"].token

    def node_id(self, name: str) -> str:
        return self.nodes[name].info["node_id"]

    def pid(self, name: str) -> int:
        return self.nodes[name].info["pid"]

    def name_of(self, node_id: str) -> str:
        for name, node in self.nodes.items():
            if node.info["node_id"] == node_id:
                return name
        raise KeyError(node_id)

    def kill_node(self, name: str) -> None:
        """SIGKILL node ``name``'s process and its workers, as if the machine died."""
        _kill_tree(self.pid(name))

    def wait_node_dead(self, name: str, timeout: float = 20.0) -> None:
        import strato

        node_id = self.node_id(name)

        def dead():
            return any(n["NodeID"] == node_id and not n["Alive"] for n in strato.nodes())
        wait_until(dead, timeout, 0.1, f"the head to mark node {name} dead")


def _start_multinode() -> MultiNode:
    import strato
    from strato.runtime.control import start_node

    if strato.is_initialized():
        strato.shutdown()
    old = os.environ.get("STRATO_HEARTBEAT_TIMEOUT")
    os.environ["STRATO_HEARTBEAT_TIMEOUT"] = HEARTBEAT_TIMEOUT_S
    dirs = {n: tempfile.mkdtemp(prefix=f"strato-mn{n}-") for n in "ABC"}
    nodes: dict = {}
    cluster = MultiNode(nodes, dirs)
    try:
        nodes["A"] = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs["A"],
                                num_cpus=1)
        for name in "BC":
            nodes[name] = start_node(head=False, address=nodes["A"].address,
                                     token=nodes["A"].token, temp_dir=dirs[name], num_cpus=1,
                                     join_bundle=nodes["A"].join_bundle,
                                     node_ip="127.0.0.1",
                                     resources=f'{{"node_{name.lower()}": 1}}')
        strato.init(address="auto", temp_dir=dirs["A"])
        wait_until(lambda: sum(n["Alive"] for n in strato.nodes()) == 3, 20, 0.05,
                   "3 live nodes")
    except BaseException:
        _stop_multinode(cluster)
        raise
    finally:
        if old is None:
            os.environ.pop("STRATO_HEARTBEAT_TIMEOUT", None)
        else:
            os.environ["STRATO_HEARTBEAT_TIMEOUT"] = old
    return cluster


def _stop_multinode(cluster: MultiNode) -> None:
    import strato
    from strato.runtime.control import stop_nodes

    if strato.is_initialized():
        strato.shutdown()
    pids = [n.info["pid"] for n in cluster.nodes.values()]
    for name in ("C", "B", "A"):
        if name in cluster.dirs:
            try:
                stop_nodes(cluster.dirs[name])
            except Exception:
                pass
    for pid in pids:
        _kill_tree(pid)
    _remove_shm_dirs(pids)
    for d in cluster.dirs.values():
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def multinode() -> Iterator[MultiNode]:
    """Head A (1 CPU) + B (1 CPU, node_b=1) + C (1 CPU, node_c=1); driver connected to A."""
    cluster = _start_multinode()
    try:
        yield cluster
    finally:
        _stop_multinode(cluster)


@pytest.fixture
def multinode_fn() -> Iterator[MultiNode]:
    """Like ``multinode`` but for one test only: for tests that kill nodes."""
    cluster = _start_multinode()
    try:
        yield cluster
    finally:
        _stop_multinode(cluster)
