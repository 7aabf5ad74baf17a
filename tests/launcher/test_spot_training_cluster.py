"""Spot training through the launcher: `strato up` a local cluster whose spot workers watch
a locally served AWS notice; the notice drains the worker and checkpoints the trainer, the
worker's processes are then killed, the autoscaler replaces it, and training resumes from
the checkpoint with exactly the uninterrupted run's weights."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

import strato
from strato.launcher import reconcile
from strato.launcher.state import StateDB
from strato.providers.local import LocalProvider
from strato.runtime.session import node_files
from tests.runtime.test_preemption import MetadataServer, _wait_for

pytestmark = pytest.mark.timeout(150)

NAME = "spotrun"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spot_training.py"


def _example():
    spec = importlib.util.spec_from_file_location("spot_training_cluster_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _workers() -> list:
    return [n for n in LocalProvider({}, NAME).list_nodes({"strato-node-kind": "worker"})
            if n.state.value == "running"]


def _kill(node_id: str) -> None:
    """SIGKILL the node's runtime process and its workers, by pid (a reclaimed machine)."""
    procs = []
    for info in node_files(str(LocalProvider({}, NAME).local_dir(node_id))):
        proc = psutil.Process(info["pid"])
        procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)


def _runtime_node(provider_node_id: str) -> dict | None:
    for node in strato.nodes():
        if node["Alive"] and node["Labels"].get("strato-node-id") == provider_node_id:
            return node
    return None


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    home = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))  # short: unix socket paths
    meta = MetadataServer()
    monkeypatch.setenv("STRATO_HOME", str(home))
    monkeypatch.setenv("STRATO_AWS_METADATA_URL", meta.url)
    monkeypatch.setenv("STRATO_NOTICE_INTERVAL", "0.1")
    monkeypatch.setenv("STRATO_HEARTBEAT_TIMEOUT", "2")
    config = tmp_path / "spot.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": NAME,
        "provider": {"type": "local", "spot_notice": "aws"},
        "autoscaler": {"tick_seconds": 0.3},
        "available_node_types": {
            "head": {"resources": {"CPU": 1}},
            "spot": {"resources": {"CPU": 1, "spot": 1}, "spot": True,
                     "min_workers": 1, "max_workers": 1},
        },
        "head_node_type": "head",
    }))
    try:
        yield config, meta
    finally:
        with contextlib.suppress(Exception):
            strato.shutdown()
        for c in StateDB(home).list():
            with contextlib.suppress(Exception):
                reconcile.down(c.config_path, yes=True)
        meta.close()
        shutil.rmtree(home, ignore_errors=True)


def test_spot_training_survives_preemption_through_the_autoscaler(cluster):
    config, meta = cluster
    example = _example()
    steps, every = 150, 10
    reconcile.up(config, yes=True)
    (first,) = _workers()
    head = LocalProvider({}, NAME).list_nodes({"strato-node-kind": "head"})[0]
    strato.init(address="auto", temp_dir=str(LocalProvider({}, NAME).local_dir(head.id)),
                log_to_driver=False)
    _wait_for(lambda: _runtime_node(first.id), 30, "the spot worker to join")

    trainer = example.Trainer.remote("cluster-job", every, 0.05)
    result_ref = trainer.train_until.remote(steps)
    _wait_for(lambda: strato.get(trainer.progress.remote(), timeout=10) >= 25, 60,
              "training to pass step 25")

    noticed = time.monotonic()
    meta.notice = json.dumps({"action": "terminate", "time": "2026-11-23T12:00:00Z"})
    _wait_for(lambda: (_runtime_node(first.id) or {}).get("Draining"), 10, "the drain")
    drained = time.monotonic() - noticed
    saved = _wait_for(lambda: strato.checkpoint.load("cluster-job"), 10, "a checkpoint")
    step_at_kill = strato.get(trainer.progress.remote(), timeout=10)
    _kill(first.id)
    meta.notice = None  # the replacement is a fresh machine with no notice pending
    killed = time.monotonic()

    result = strato.get(result_ref, timeout=120)
    (replacement,) = _workers()
    assert replacement.id != first.id
    assert result["step"] == steps
    assert _runtime_node(replacement.id)["NodeID"] == result["node"]
    assert result["resumed_from"] is not None and result["resumed_from"] >= saved["step"]
    assert step_at_kill - result["resumed_from"] <= every  # steps lost <= checkpoint interval
    assert np.array_equal(result["w"], example.train_locally(steps))
    print(f"\nFIGURE notice -> drained {drained:.2f}s; kill -> training finished on the "
          f"replacement {time.monotonic() - killed:.1f}s; steps redone "
          f"{step_at_kill - result['resumed_from']}")
