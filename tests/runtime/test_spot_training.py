"""Spot training end to end on real runtime processes: a notice is served locally, the
spot node is then killed, a replacement joins, and training resumes from the last
checkpoint with exactly the uninterrupted run's final weights."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest

import strato
from strato.runtime.control import start_node, stop_nodes
from tests.runtime.test_preemption import MetadataServer, _wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spot_training.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("spot_training_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kill_node(pid: int) -> None:
    """SIGKILL a node process and its workers, as a reclaimed spot machine would vanish."""
    proc = psutil.Process(pid)
    victims = [proc, *proc.children(recursive=True)]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


@pytest.mark.timeout(120)
def test_training_resumes_after_preemption_with_identical_weights():
    example = _load_example()
    steps, every = 150, 10
    root = tempfile.mkdtemp(prefix="strato-spot-train-")
    meta = MetadataServer()
    env = {"STRATO_NOTICE_INTERVAL": "0.1", "STRATO_AWS_METADATA_URL": meta.url,
           "STRATO_HEARTBEAT_TIMEOUT": "2", "STRATO_CHECKPOINT_DIR": os.path.join(root, "ckpt")}
    dirs = {name: os.path.join(root, name) for name in ("head", "spot1", "spot2")}
    try:
        head = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs["head"],
                          num_cpus=1, env=env)
        spot1 = start_node(head=False, address=head.address, token=head.token,
                           join_bundle=head.join_bundle, temp_dir=dirs["spot1"], num_cpus=1, resources=json.dumps({"spot": 1}),
                           spot_notice="aws", env=env)
        strato.init(address="auto", temp_dir=dirs["head"])
        trainer = example.Trainer.remote("job-1", every, 0.05)
        result_ref = trainer.train_until.remote(steps)
        _wait_for(lambda: strato.get(trainer.progress.remote(), timeout=10) >= 25, 60,
                  "training to pass step 25")

        meta.notice = json.dumps({"action": "terminate", "time": "2026-11-23T12:00:00Z"})
        _wait_for(lambda: any(n["Draining"] for n in strato.nodes()
                              if n["NodeID"] == spot1.info["node_id"]), 10, "the drain")
        saved = _wait_for(lambda: strato.checkpoint.load("job-1"), 10, "a checkpoint")
        step_at_kill = strato.get(trainer.progress.remote(), timeout=10)
        _kill_node(spot1.info["pid"])

        spot2 = start_node(head=False, address=head.address, token=head.token,
                           join_bundle=head.join_bundle, temp_dir=dirs["spot2"], num_cpus=1, resources=json.dumps({"spot": 1}),
                           env=env)
        result = strato.get(result_ref, timeout=90)

        assert result["step"] == steps
        assert result["node"] == spot2.info["node_id"]
        assert result["resumed_from"] is not None and result["resumed_from"] >= saved["step"] - every
        assert step_at_kill - result["resumed_from"] <= every  # steps lost <= interval
        assert np.array_equal(result["w"], example.train_locally(steps))
    finally:
        strato.shutdown()
        for d in dirs.values():
            stop_nodes(d)
        meta.close()
        shutil.rmtree(root, ignore_errors=True)
