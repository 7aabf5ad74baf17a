"""Spot training on GCP end to end: the GCE fake (as strict as GCE) plus sshd hosts.

`strato up` with a spot worker type whose first zone has no spot capacity (up falls back
to the next zone); a checkpointing training job submitted to the head; the worker is
preempted mid-job (the `compute.instances.preempted` operation at once, the VM STOPPING
through its shutdown grace with the metadata notice up, then deleted); the monitor on the
head records the preemption, launches a replacement (itself through the stocked-out
zone), which must carry the cluster's SSH key to be set up at all (the hosts let in only
metadata keys); the job finishes on it with exactly the uninterrupted run's weights;
`status` shows the preemption; `down` leaves nothing.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from strato.launcher import commands, reconcile
from strato.launcher.state import StateDB
from tests.harness.ssh_hosts import strato_processes

pytestmark = pytest.mark.timeout(240)

NAME = "gspot"
ZONES = ["us-central1-a", "us-central1-b"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spot_training.py"
STEPS, EVERY, STEP_S = 240, 10, 0.05

JOB = '''
import importlib.util, json, os, sys, time
from pathlib import Path
import numpy as np
import strato

spec = importlib.util.spec_from_file_location("spot_training_gcp_job", {example!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
out = Path({out!r})
strato.init(address="auto", log_to_driver=False)
strato.checkpoint.delete("gcp-job")
trainer = example.Trainer.remote("gcp-job", {every}, {step_s})
ref = trainer.train_until.remote({steps})
deadline = time.monotonic() + 200
while not strato.wait([ref], timeout=0.2)[0] and time.monotonic() < deadline:
    try:
        step = strato.get(trainer.progress.remote(), timeout=2)
    except Exception:
        continue
    (out / "progress.tmp").write_text(str(step))
    os.replace(out / "progress.tmp", out / "progress")
result = strato.get(ref, timeout=30)
same = bool(np.array_equal(result["w"], example.train_locally({steps})))
(out / "result.json").write_text(json.dumps({{
    "step": result["step"], "resumed_from": result["resumed_from"], "node": result["node"],
    "equal": same, "nodes": {{n["NodeID"]: n["Labels"].get("strato-node-id")
                             for n in strato.nodes()}}}}))
print("job done, weights equal:", same)
'''


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _progress(out: Path) -> int:
    try:
        return int((out / "progress").read_text() or 0)
    except (OSError, ValueError):
        return 0


def test_gcp_spot_training_survives_preemption(gce_host_pool, gce_bridge_fake, ssh_hosts,
                                               shared_tmp_path, tmp_path, monkeypatch):
    fake = gce_bridge_fake
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATO_MONITOR", raising=False)  # GCP default: on the head
    fake.no_capacity(ZONES[0], spot=True)  # for `up` and for the monitor's replacement
    fake.preempt_grace_s = 6.0
    out = shared_tmp_path / "job"
    out.mkdir()
    script = shared_tmp_path / "train_job.py"
    script.write_text(JOB.format(example=str(EXAMPLE), out=str(out), every=EVERY,
                                 step_s=STEP_S, steps=STEPS))
    config = shared_tmp_path / "gspot.yaml"
    config.write_text(yaml.safe_dump({
        "cluster_name": NAME,
        "provider": {"type": "gcp", "project_id": "strato-test",
                     "availability_zone": ZONES[0], "api_endpoint": fake.endpoint},
        # no private key: strato makes one; the hosts accept it only from ssh-keys metadata
        "auth": {"ssh_user": "root"},
        "runtime_python": sys.executable,
        "autoscaler": {"tick_seconds": 0.5},
        "available_node_types": {
            "head": {"node_config": {"machineType": "n2-standard-2"},
                     "resources": {"CPU": 2}},
            "spot": {"node_config": {"machineType": "n2-standard-4"}, "zones": ZONES,
                     "resources": {"CPU": 2, "spot": 1}, "spot": True,
                     "min_workers": 1, "max_workers": 1},
        },
        "head_node_type": "head",
    }))
    job: dict = {}
    try:
        reconcile.up(config, yes=True)
        workers = {n: i for n, i in fake.instances.items()
                   if i["labels"]["strato-node-kind"] == "worker"}
        ((first, inst),) = workers.items()
        assert inst["zone"].endswith(ZONES[1])  # up fell back past the stocked-out zone

        runner = threading.Thread(
            target=lambda: job.update(code=commands.submit(config, script)), daemon=True)
        runner.start()
        _wait(lambda: _progress(out) >= 30, 90, "the job to pass step 30")

        preempted_at = time.time()
        fake.preempt(first)
        replacement = _wait(lambda: next(
            (n for n, i in fake.instances.items() if n != first
             and i["labels"]["strato-node-kind"] == "worker"), None), 30,
            "the monitor to launch a replacement")
        assert first in fake.instances  # still in its grace: the monitor did not delete it
        assert fake.instances[replacement]["zone"].endswith(ZONES[1])
        _wait(lambda: first not in fake.instances, 30, "the preempted VM to be gone")

        runner.join(timeout=150)
        assert not runner.is_alive() and job.get("code") == 0, job
        result = json.loads((out / "result.json").read_text())
        assert result["equal"] and result["step"] == STEPS, result
        assert result["resumed_from"] is not None and result["resumed_from"] >= 30
        assert result["nodes"][result["node"]] == replacement  # finished on the replacement

        status = commands.status(config)
        events = status["autoscaler"]["events"]
        (pre,) = [e for e in events if e["kind"] == "preempted"]
        assert pre["node"] == first and "shutdown grace" in pre["message"]
        assert any("autoscaler preempted" in e["message"] for e in status["events"])
        assert any(e["kind"] == "capacity-error" and e["zone"] == ZONES[0] for e in events)
        ready = [e for e in events if e["kind"] == "ready" and e["node"] == replacement]
        assert ready, [(e["kind"], e["message"]) for e in events]
        assert not [e for e in events if e["kind"] == "setup-failed"]
        assert not [e for e in events if e["kind"] == "terminate" and e["node"] == first]
        print(f"\nFIGURE preemption -> operation seen by the monitor "
              f"{pre['time'] - preempted_at:.1f}s; -> replacement ready "
              f"{ready[0]['time'] - preempted_at:.1f}s; preempted at step >= 30, the "
              f"replacement resumed from step {result['resumed_from']} (the grace let it "
              "keep training and checkpointing)")
        assert {n["id"] for n in status["nodes"]} >= {replacement}

        reconcile.down(config, yes=True)
        fake.settle()
        assert fake.instances == {} and StateDB().get(NAME) is None
        for host in ssh_hosts:  # every VM halted: nothing strato started still runs
            assert host.init_pid == 0 or not strato_processes(host), host.name
    finally:
        if StateDB().get(NAME) is not None:
            reconcile.down(config, yes=True)
        fake.settle()
