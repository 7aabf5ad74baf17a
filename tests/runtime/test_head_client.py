"""``HeadClient``: one way to call the head, one node schema, and "head down" only when
the connection is lost."""

from __future__ import annotations

import shutil
import tempfile

import pytest

import strato
from strato import exceptions as exc
from strato.runtime.api import RAY_NODE_KEYS
from strato.runtime.control import start_node, stop_nodes
from strato.runtime.head_client import HeadClient

pytestmark = pytest.mark.timeout(90)

SCHEMA = {"node_id", "alive", "draining", "drain_reason", "address", "node_ip", "resources",
          "available", "labels", "idle_seconds", "num_actors", "object_store_used"}


@pytest.fixture
def head_dir():
    temp_dir = tempfile.mkdtemp(prefix="strato-hc-")
    try:
        node = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=temp_dir,
                          num_cpus=1, labels='{"strato-node-id": "n-1"}')
        yield temp_dir, node
    finally:
        stop_nodes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_attaches_without_becoming_a_node_and_speaks_one_schema(head_dir):
    temp_dir, node = head_dir
    with HeadClient(temp_dir) as head:
        (rec,) = head.nodes()  # attaching added no node
        assert set(rec) == SCHEMA
        assert rec["node_id"] == node.info["node_id"] and rec["alive"] is True
        assert rec["resources"]["CPU"] == 1.0 and rec["labels"] == {"strato-node-id": "n-1"}
        assert head.demand() == []
        assert head.checkpoint_load("missing") is None
        assert head.checkpoint_save("k", b"v") == 1 and head.checkpoint_load("k") == b"v"
        assert head.checkpoint_delete("k") is True
        assert head.drain(rec["node_id"], "test") is True
        assert [e["kind"] for e in head.events()] == ["drain"]
        assert head.nodes()[0]["draining"] is True
    assert not strato.is_initialized()  # never touched this process's runtime state


def test_strato_nodes_keeps_rays_format(head_dir):
    temp_dir, _ = head_dir
    strato.init(address="auto", temp_dir=temp_dir, log_to_driver=False)
    try:
        (ray_node,) = strato.nodes()
        with HeadClient() as head:  # reuses this process's connection
            (rec,) = head.nodes()
        assert set(ray_node) == {RAY_NODE_KEYS[k] for k in SCHEMA}
        assert ray_node["NodeID"] == rec["node_id"] and ray_node["Alive"] is True
        assert ray_node["Resources"] == rec["resources"]
        assert ray_node["Labels"] == rec["labels"]
        assert strato.is_initialized()  # closing a reused connection leaves it open
    finally:
        strato.shutdown()


def test_errors_of_a_call_are_not_head_down(head_dir):
    temp_dir, _ = head_dir
    with HeadClient(temp_dir) as head:
        with pytest.raises(KeyError, match="no node"):
            head.drain("ffff0000", "nobody")
        with pytest.raises(AttributeError):
            head.call("no_such_method")
        assert len(head.nodes()) == 1  # the connection stayed up


def test_head_unreachable_only_when_the_connection_is_lost(head_dir, tmp_path):
    with pytest.raises(exc.HeadUnreachableError, match="no strato node") as info:
        HeadClient(str(tmp_path)).nodes()
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, exc.StratoError)

    temp_dir, _ = head_dir
    head = HeadClient(temp_dir)
    assert len(head.nodes()) == 1
    stop_nodes(temp_dir)
    with pytest.raises(exc.HeadUnreachableError):
        head.nodes()
    with pytest.raises(exc.HeadUnreachableError):  # and stays so: nothing to attach to
        head.nodes()
