"""Spot preemption inside the runtime: a notice served by a local metadata server drains
the node (no new work, queued work moves, actors get their checkpoint call), and
checkpoints saved to the head survive the node."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import tempfile
import threading
import time

import pytest

import strato
from strato.runtime.control import start_node, stop_nodes
from strato.runtime.head_client import HeadClient


class MetadataServer:
    """A tiny stand-in for the AWS instance metadata service on loopback."""

    def __init__(self):
        self.notice: str | None = None
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # IMDSv2 token
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"test-token")

            def do_GET(self):
                server.hits += 1
                if self.path == "/latest/meta-data/spot/instance-action" and server.notice:
                    body = server.notice.encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def spot_cluster():
    root = tempfile.mkdtemp(prefix="strato-spot-")
    meta = MetadataServer()
    dirs = [os.path.join(root, "head"), os.path.join(root, "spot")]
    env = {"STRATO_NOTICE_INTERVAL": "0.1", "STRATO_AWS_METADATA_URL": meta.url,
           "STRATO_CHECKPOINT_DIR": os.path.join(root, "ckpt")}
    try:
        head = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs[0], num_cpus=1,
                          env=env)
        spot = start_node(head=False, address=head.address, token=head.token, temp_dir=dirs[1],
                          join_bundle=head.join_bundle,
                          num_cpus=1, resources=json.dumps({"spot": 2}), spot_notice="aws", env=env)
        strato.init(address="auto", temp_dir=dirs[0])
        yield meta, head, spot
    finally:
        strato.shutdown()
        for d in dirs:
            stop_nodes(d)
        meta.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(90)
def test_notice_drains_node_and_calls_actor_checkpoint_hook(spot_cluster):
    meta, head, spot = spot_cluster
    spot_id = spot.info["node_id"]

    @strato.remote(resources={"spot": 1})
    class Trainer:
        def __init__(self):
            self.step = 0

        def train(self, n):
            self.step += n
            return self.step

        def checkpoint_on_drain(self):
            strato.checkpoint.save("trainer", {"step": self.step})

    trainer = Trainer.remote()
    assert strato.get(trainer.train.remote(7), timeout=30) == 7
    _wait_for(lambda: meta.hits > 0, 10, "the node to poll the metadata server")

    noticed = time.monotonic()
    meta.notice = json.dumps({"action": "terminate", "time": "2026-11-23T12:00:00Z"})
    node = _wait_for(lambda: next((n for n in strato.nodes() if n["NodeID"] == spot_id
                                   and n["Draining"]), None), 10, "the spot node to drain")
    assert "preemption notice" in node["DrainReason"]
    saved = _wait_for(lambda: strato.checkpoint.load("trainer"), 10, "the checkpoint hook")
    assert saved == {"step": 7}
    drained_after = time.monotonic() - noticed
    assert drained_after < 10

    # a draining node takes no new work: a task needing its resource waits (demand)
    @strato.remote(resources={"spot": 1})
    def on_spot():
        return strato.get_runtime_context().get_node_id()

    pending = on_spot.remote()
    ready, _ = strato.wait([pending], timeout=1.0)
    assert ready == []
    head = HeadClient()
    assert any(d["shape"].get("spot") == 1 for d in head.demand())
    events = head.events()
    assert [e["kind"] for e in events if e["node"] == spot_id][:2] == ["preemption-notice", "drain"]


@pytest.mark.timeout(60)
def test_checkpoint_roundtrip_local_uri(tmp_path):
    strato.checkpoint.save("model", {"w": [1, 2, 3]}, uri=str(tmp_path))
    assert strato.checkpoint.load("model", uri=f"file://{tmp_path}") == {"w": [1, 2, 3]}
    assert strato.checkpoint.load("missing", default=5, uri=str(tmp_path)) == 5
    assert strato.checkpoint.delete("model", uri=str(tmp_path))
    with pytest.raises(ValueError, match="key"):
        strato.checkpoint.save("", 1, uri=str(tmp_path))
    with pytest.raises(ValueError, match="uri"):
        strato.checkpoint.save("k", 1, uri="ftp://x/y")


def test_gcp_notice_format_needs_the_metadata_flavor_header():
    """GCE answers instance/preempted with FALSE, then TRUE, only to Metadata-Flavor: Google."""
    from strato.runtime import preemption

    state = {"preempted": False, "headers_ok": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Metadata-Flavor") != "Google":
                state["headers_ok"] = False
                self.send_response(403)
                self.end_headers()
                return
            body = b"TRUE" if state["preempted"] else b"FALSE"
            self.send_response(200 if self.path == "/computeMetadata/v1/instance/preempted"
                               else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert preemption.check_gcp(base) is None
        state["preempted"] = True
        assert preemption.check_gcp(base) == "preempted"
        assert state["headers_ok"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_s3_checkpoints_against_moto(moto_endpoint):
    import boto3

    boto3.client("s3").create_bucket(Bucket="ckpt")
    strato.checkpoint.save("run/1", {"step": 40}, uri="s3://ckpt/experiments")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="ckpt")["Contents"]]
    assert keys == ["experiments/run/1"]
    assert strato.checkpoint.load("run/1", uri="s3://ckpt/experiments") == {"step": 40}
    assert strato.checkpoint.load("run/2", default="none", uri="s3://ckpt/experiments") == "none"
    assert strato.checkpoint.delete("run/1", uri="s3://ckpt/experiments")
    assert strato.checkpoint.load("run/1", uri="s3://ckpt/experiments") is None
