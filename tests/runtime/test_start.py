"""`strato start`'s machine-readable answer, and the one error type of node start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from strato import exceptions as exc
from strato.runtime.control import StartError, start_node

pytestmark = pytest.mark.timeout(90)


def test_start_json_prints_the_node_file():
    temp_dir = tempfile.mkdtemp(prefix="strato-start-")
    cli = [sys.executable, "-m", "strato.cli"]
    try:
        res = subprocess.run([*cli, "start", "--head", "--port", "0", "--node-ip", "127.0.0.1",
                              "--num-cpus", "1", "--temp-dir", temp_dir, "--json"],
                             capture_output=True, text=True, timeout=80)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert len(lines) == 1, res.stdout  # the JSON is all of stdout
        info = json.loads(lines[0])
        assert info["head"] is True and info["head_address"].startswith("127.0.0.1:")
        assert os.path.exists(info["socket"]) and os.path.exists(info["token_file"])
        with open(info["token_file"]) as f:
            token = f.read().strip()
        assert token not in res.stdout
        assert f"strato head started at {info['head_address']}" in res.stderr
    finally:
        subprocess.run([*cli, "stop", "--temp-dir", temp_dir], capture_output=True, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_start_errors_are_strato_errors(tmp_path):
    with pytest.raises(StartError, match="JSON object") as info:
        start_node(head=True, temp_dir=str(tmp_path), resources="not json")
    # one type for every way a node cannot start: a StratoError, and the ConnectionError
    # strato.init() has always raised for it
    assert isinstance(info.value, exc.StratoError) and isinstance(info.value, ConnectionError)
