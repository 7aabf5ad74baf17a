"""The between-nodes cases of microbenchmark.py: two nodes on this machine.

Node A is the head (1 CPU, custom resource ``node_a``), node B joins it (1 CPU,
``node_b``); each has its own temp dir and object store, and they talk over loopback
(strato: gRPC between the node agents; Ray: the object managers). The driver is
connected to A. Tasks and actors are pinned with ``resources={"node_a": 0.01}`` /
``{"node_b": 0.01}``.

- strato: ``python -m strato.cli start --head --port 0 ... --json``, then
  ``start --address HEAD --join-bundle ...`` for B; ``strato.init(address=HEAD,
  temp_dir=<A's dir>)`` attaches the driver to A.
- Ray: ``ray start --head --block ...`` and ``ray start --address 127.0.0.1:P --block``
  (free ports for everything that listens), then ``ray.init(address="127.0.0.1:P")``,
  which picks the head when two raylets share one IP.

Every process started here is stopped by pid (the tree under each node process, plus
any process whose command line names one of our temp dirs), never by name, so other
clusters on the machine are left alone. Temp dirs and strato's shared-memory dirs go too.

The cases time only the part they are about (each call returns the seconds it timed):

- ``between nodes get 100 MB object`` (GB/s, 100 MiB counts as 0.1 GB as in
  ``single client put gigabytes``): a task pinned to B returns a fresh 100 MiB uint8
  array; the driver waits with ``wait(fetch_local=False)`` until it is sealed in B's
  store (creating it is not timed), then times ``get`` on A: the pull B -> A over
  loopback into A's store and mapping it in the driver. A new object every call, so
  every timed get really copies 100 MiB.
- ``between nodes tasks with 1 KB args on the other node`` / ``... 1 MB ...`` (tasks/s):
  an actor pinned to B ``put``s a batch of fresh objects (owner: the actor, value in
  B's store) and returns their refs (not timed); the driver then times submitting one
  task pinned to A per ref, with the ref as its argument, and getting all the results.
- ``between nodes tasks run on the other node`` (tasks/s): the driver on A submits 200
  tasks pinned to B (one CPU, so one runs at a time there) and gets their results: how
  fast work streams to a node other than the driver's, as it does to a cluster's workers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# name, unit, in the order they run
CASES: list[tuple[str, str]] = [
    ("between nodes get 100 MB object", "GB/s"),
    ("between nodes tasks with 1 KB args on the other node", "ops/s"),
    ("between nodes tasks with 1 MB args on the other node", "ops/s"),
    ("between nodes tasks run on the other node", "ops/s"),
]
CASE_NAMES = [c for c, _ in CASES]

ON_A = {"node_a": 0.01}
ON_B = {"node_b": 0.01}
BIG = 100 * 1024 * 1024          # bytes of the big object
ARG_BATCH = {"1 KB": (1024, 500), "1 MB": (1024 * 1024, 100)}   # size, tasks per call
REMOTE_BATCH = 200      # tasks per call of "tasks run on the other node"
# Each node's store; the same for both backends (a few 100 MiB objects at once at most).
STORE_BYTES = 2 * 1024**3
START_TIMEOUT = 90.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Process bookkeeping: everything by pid
# --------------------------------------------------------------------------


class _Started:
    """The pids and temp dirs one cluster start made; ``stop()`` ends them all."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.dirs: list[str] = []
        self.popens: list[subprocess.Popen] = []

    def mkdtemp(self, prefix: str) -> str:
        d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")   # short: unix socket paths
        self.dirs.append(d)
        return d

    def _ours(self) -> list:
        """Our node processes, their descendants, and any process naming one of our dirs."""
        import psutil  # Ray's venv has it once ray is imported (ray/thirdparty_files)

        procs: dict[int, Any] = {}
        for pid in self.pids + [p.pid for p in self.popens]:
            try:
                p = psutil.Process(pid)
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
            except psutil.NoSuchProcess:
                continue
        if self.dirs:
            me = os.getpid()
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                except (psutil.Error, TypeError):
                    continue
                if p.pid != me and any(d in cmd for d in self.dirs):
                    procs.setdefault(p.pid, p)
        return list(procs.values())

    def stop(self, grace: float = 10.0) -> None:
        import psutil

        procs = self._ours()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for p in self.popens:
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
        left = [p.pid for p in self._ours() if p.is_running()]
        if left:
            _log(f"between_nodes: processes still running after stop: {left}")
        for pid in self.pids:   # strato's store of a node that could not clean up
            for path in glob.glob(f"/dev/shm/strato-{pid}-*"):
                shutil.rmtree(path, ignore_errors=True)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# Starting two nodes
# --------------------------------------------------------------------------


def _strato_start(started: _Started, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "strato.cli", "start", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT)
    info = None
    for line in proc.stdout.splitlines():
        if line.strip().startswith("{"):
            info = json.loads(line)
    if info and info.get("pid"):
        started.pids.append(int(info["pid"]))
    if proc.returncode != 0 or not info:
        raise RuntimeError(f"strato start failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return info


def _start_strato(rt: Any, started: _Started) -> None:
    da, db = started.mkdtemp("sbA-"), started.mkdtemp("sbB-")
    common = ["--num-cpus", "1", "--node-ip", "127.0.0.1",
              "--object-store-memory", str(STORE_BYTES)]
    head = _strato_start(started, ["--head", "--port", "0", "--temp-dir", da,
                                   "--resources", json.dumps({"node_a": 1}), *common])
    _strato_start(started, ["--address", head["head_address"],
                            "--join-bundle", head["join_bundle"], "--temp-dir", db,
                            "--resources", json.dumps({"node_b": 1}), *common])
    rt.init(address=head["head_address"], temp_dir=da, log_to_driver=False)


def _ray_start(started: _Started, ray: str, args: list[str], log: str, env: dict) -> None:
    with open(log, "ab") as f:
        p = subprocess.Popen([ray, "start", "--block", *args], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    started.popens.append(p)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = Path(log).read_text(errors="replace")
        if "Ray runtime started" in text:
            return
        if p.poll() is not None or time.monotonic() > deadline:
            why = f"exit code {p.returncode}" if p.returncode is not None else "timed out"
            raise RuntimeError(f"ray start failed ({why}): {text.strip()[-800:]}")
        time.sleep(0.1)


def _start_ray(rt: Any, started: _Started) -> None:
    import logging

    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    logs = started.mkdtemp("rbL-")
    for name, res in (("A", {"node_a": 1}), ("B", {"node_b": 1})):
        d = started.mkdtemp(f"rb{name}-")
        args = [f"--temp-dir={d}", "--num-cpus=1", f"--resources={json.dumps(res)}",
                "--node-ip-address=127.0.0.1", f"--object-store-memory={STORE_BYTES}",
                "--disable-usage-stats", f"--metrics-export-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}"]
        if name == "A":
            args += ["--head", f"--port={port}", "--include-dashboard=false",
                     f"--ray-client-server-port={_free_port()}"]
        else:
            args += [f"--address=127.0.0.1:{port}"]
        _ray_start(started, ray, args, os.path.join(logs, f"{name}.log"), env)
    rt.init(address=f"127.0.0.1:{port}", logging_level=logging.ERROR, log_to_driver=False)


def _wait_two_nodes(rt: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in rt.nodes() if n.get("Alive")]
        res = {k for n in alive for k in n.get("Resources", {})}
        if len(alive) == 2 and {"node_a", "node_b"} <= res:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"two nodes not up after {timeout:.0f}s: {rt.nodes()}")
        time.sleep(0.1)
    here = rt.get_runtime_context().get_node_id()
    mine = next((n for n in alive if n["NodeID"] == here), None)
    if mine is None or "node_a" not in mine.get("Resources", {}):
        raise RuntimeError(f"the driver is not on node A (node {here})")


class TwoNodes:
    """``start()``: A (head) and B on this machine, ``rt`` connected to A. ``stop()``:
    disconnect and end every process ``start()`` made, even after it failed half-way."""

    def __init__(self, backend: str, rt: Any) -> None:
        self.backend, self.rt = backend, rt
        self.started = _Started()

    def start(self) -> None:
        t0 = time.perf_counter()
        (_start_ray if self.backend == "ray" else _start_strato)(self.rt, self.started)
        _wait_two_nodes(self.rt)
        _log(f"[{self.backend}] two nodes up in {time.perf_counter() - t0:.1f}s")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.rt.shutdown()
        self.started.stop()


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def setup_case(rt: Any, name: str) -> tuple[Callable[[], float], float, list]:
    """(fn, multiplier, keepalive): one fn() call is ``multiplier`` ops (GB for the
    100 MB case) and returns the seconds it timed (creation on B is left out)."""
    import numpy as np

    if name == "between nodes get 100 MB object":
        @rt.remote(resources=ON_B)
        def make_big(n):
            return np.zeros(n, dtype=np.uint8)

        def fetch_big() -> float:
            ref = make_big.remote(BIG)
            rt.wait([ref], fetch_local=False)        # sealed in B's store, not pulled
            t0 = time.perf_counter()
            arr = rt.get(ref)
            dt = time.perf_counter() - t0
            if arr.nbytes != BIG:
                raise AssertionError(f"got {arr.nbytes} bytes")
            return dt

        return fetch_big, BIG / (1024 * 1024) / 1000, []

    if name == "between nodes tasks run on the other node":
        @rt.remote(resources=ON_B)
        def noop():
            return b"ok"

        def tasks_on_b() -> float:
            t0 = time.perf_counter()
            rt.get([noop.remote() for _ in range(REMOTE_BATCH)])
            return time.perf_counter() - t0

        return tasks_on_b, REMOTE_BATCH, []

    label = name.removeprefix("between nodes tasks with ").removesuffix(" args on the other node")
    if label not in ARG_BATCH:
        raise ValueError(f"unknown case {name!r}")
    size, n = ARG_BATCH[label]

    @rt.remote(num_cpus=0, resources=ON_B)
    class Maker:
        def make(self, n, size):
            return [rt.put(np.zeros(size, dtype=np.uint8)) for _ in range(n)]

    @rt.remote(resources=ON_A)
    def consume(x):
        return b"ok"

    maker = Maker.remote()

    def tasks_with_remote_args() -> float:
        refs = rt.get(maker.make.remote(n, size))  # fresh objects on B each call
        t0 = time.perf_counter()
        rt.get([consume.remote(r) for r in refs])
        return time.perf_counter() - t0

    return tasks_with_remote_args, n, [maker]
