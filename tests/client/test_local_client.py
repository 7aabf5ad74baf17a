"""The serverless client end to end on the local provider: `init(cluster=...)` from
processes that are no node of the cluster, talking to the head's client endpoint.

One cluster serves the module; the first client brings it up by itself (auto-up). Its
head keeps a lost session for 3 s here (``STRATO_CLIENT_GRACE_S``) so the test of the
grace period stays short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import strato
from strato.exceptions import AuthenticationError, LauncherError, VersionMismatchError
from strato.launcher import reconcile
from strato.launcher.cluster import open_cluster
from strato.launcher.state import StateDB
from strato.runtime.head_client import HeadClient
from strato.runtime.protocol import handshake
from tests.client.helpers import ok, run_client, said, write_script

pytestmark = pytest.mark.timeout(120)
GRACE_S = 3


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def home():
    # short: node sockets live under it (unix socket paths are limited to 107 bytes)
    path = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATO_HOME", str(path))
        mp.setenv("STRATO_CLIENT_GRACE_S", str(GRACE_S))
        yield path
        for cluster in StateDB(path).list():
            try:
                reconcile.down(cluster.config_path, yes=True)
            except Exception:
                pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def config(home):
    path = home / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "cluster_name": "client-test", "provider": {"type": "local"},
        "available_node_types": {"head": {"resources": {"CPU": 2}}},
        "head_node_type": "head"}))
    return path


@pytest.fixture(scope="module")
def first_client(home, config):
    """The first client: the cluster is not up, so init() runs `up` and then connects."""
    script = write_script(home / "first.py", """
        t = time.time()
        strato.init(cluster=CONFIG)
        @strato.remote
        def shout(x):
            print("shouting", x)
            return x + 1
        print(f"result {strato.get(shout.remote(41))}", flush=True)   # one write
        print("cold start", round(time.time() - t, 2))
        strato.shutdown()
    """)
    return run_client(script, config, timeout=100)


def _head_dir(config) -> str:
    cluster = open_cluster(config, echo=False)
    return cluster.temp_dir_path(cluster.require_head())


def _head_info(config) -> dict:
    from strato.runtime.session import node_files
    return next(i for i in node_files(_head_dir(config)) if i["head"])


def test_auto_up_then_attach_fast_with_streamed_prints(first_client, config, home):
    out = ok(first_client)
    assert "it is not up; running `strato up`" in out and "is up; head at" in out
    assert "result 42" in out
    assert "(shout pid=" in out and "shouting 41" in out   # prefixed, on the laptop
    script = write_script(home / "attach.py", """
        t = time.time()
        strato.init(cluster=CONFIG, log_to_driver=False)
        say("attach", time.time() - t)
        @strato.remote
        def shout(x):
            print("silenced", x)
            return x
        assert strato.get(shout.remote(1)) == 1
        strato.shutdown()
    """)
    out = ok(run_client(script, config))
    assert "strato up" not in out and "silenced" not in out
    assert float(said(out, "attach")) < 3.0   # goal 0.5 s: bench/client.py


def test_local_module_by_value_and_working_dir(first_client, config, home, tmp_path):
    ok(first_client)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "mylocal.py").write_text("def triple(x):\n    return 3 * x\n")
    wd = tmp_path / "wd"
    (wd / "pkg").mkdir(parents=True)
    (wd / "data.txt").write_text("payload")
    (wd / "pkg" / "__init__.py").write_text("VALUE = 'from working dir'\n")
    (wd / "secret.txt").write_text("do not sync")
    (wd / ".gitignore").write_text("secret.txt\n")
    (wd / ".venv").mkdir()
    (wd / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (wd / "__pycache__").mkdir()
    (wd / "__pycache__" / "x.pyc").write_bytes(b"\0")
    script = write_script(tmp_path / "code.py", """
        sys.path.insert(0, sys.argv[2])
        import mylocal
        strato.init(cluster=CONFIG, working_dir=sys.argv[3])
        @strato.remote
        def use(x):
            import pkg   # importable: the working dir is on sys.path
            return (mylocal.triple(x), open("data.txt").read(), pkg.VALUE,
                    sorted(os.listdir(".")))
        print(json.dumps(strato.get(use.remote(5))))
        strato.shutdown()
    """)
    out = ok(run_client(script, config, str(lib), str(wd)))
    triple, data, value, listing = json.loads(out.strip().splitlines()[-1])
    assert (triple, data, value) == (15, "payload", "from working dir")
    assert listing == [".gitignore", "data.txt", "pkg"]
    # the same content again: nothing is sent twice, the package is the same one
    pkgs = Path(_head_dir(config), "working_dirs")
    before = sorted(p.name for p in pkgs.iterdir())
    ok(run_client(script, config, str(lib), str(wd)))
    assert sorted(p.name for p in pkgs.iterdir()) == before


def test_map_1000_and_100_mb_both_ways(first_client, config, home):
    ok(first_client)
    script = write_script(home / "map.py", """
        import numpy as np
        strato.init(cluster=CONFIG)
        @strato.remote
        def sq(x):
            return x * x
        @strato.remote
        def add(a, b):
            return a + b
        @strato.remote
        def fails(x):
            if x == 3:
                raise ValueError("three")
            return x
        @strato.remote
        def double(a):
            return a * 2
        assert list(sq.map(range(1000), max_in_flight=100)) == [x * x for x in range(1000)]
        assert sorted(sq.map(range(50), order_outputs=False)) == [x * x for x in range(50)]
        assert list(add.starmap([(1, 2), (3, 4)])) == [3, 7]
        assert list(add.map([1, 2], [10, 20])) == [11, 22]
        got = list(fails.map(range(5), return_exceptions=True))
        assert got[:3] == [0, 1, 2] and isinstance(got[3], ValueError) and got[4] == 4
        try:
            list(fails.map(range(5)))
        except ValueError as e:
            assert "three" in str(e) and "Traceback" in str(e)   # the remote traceback
        else:
            raise AssertionError("no error")
        big = np.arange(100 * 1024 * 1024 // 8, dtype=np.int64)     # 100 MB
        t = time.time()
        out = strato.get(double.remote(big))
        assert out.shape == big.shape and int(out[-1]) == 2 * int(big[-1])
        ref = strato.put(big)
        assert np.array_equal(strato.get(ref), big)
        print("100MB round trips", round(time.time() - t, 2))
        strato.shutdown()
    """)
    ok(run_client(script, config))


def test_spawn_survives_the_client_and_from_id_finds_it(first_client, config, home):
    ok(first_client)
    spawn = write_script(home / "spawn.py", """
        strato.init(cluster=CONFIG)
        @strato.remote
        def slow(x):
            time.sleep(1.5)
            return {"value": x}
        @strato.remote
        def forever():
            time.sleep(60)
        call = slow.options(retention_s=600).spawn(7)
        say("ID", call.id, forever.spawn().id)
        os._exit(0)   # no goodbye: the process is simply gone
    """)
    out = ok(run_client(spawn, config))
    call_id, forever_id = said(out, "ID").split()
    fetch = write_script(home / "fetch.py", """
        from strato.exceptions import DurableCallNotFoundError, TaskCancelledError
        strato.init(cluster=CONFIG)
        say("GOT", strato.FunctionCall.from_id(sys.argv[2]).get(timeout=30))
        other = strato.FunctionCall.from_id(sys.argv[3])
        other.cancel()
        try:
            other.get(timeout=30)
        except TaskCancelledError:
            print("CANCELLED")
        try:
            strato.FunctionCall.from_id("00" * 16)
        except DurableCallNotFoundError as e:
            say("UNKNOWN", e)
        strato.shutdown()
    """)
    out = ok(run_client(fetch, config, call_id, forever_id))
    assert "GOT {'value': 7}" in out and "CANCELLED" in out
    assert "UNKNOWN no durable call" in out


def test_ctrl_c_cancels_the_sessions_calls_not_its_spawns(first_client, config, home,
                                                          tmp_path):
    ok(first_client)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = write_script(home / "ctrlc.py", """
        strato.init(cluster=CONFIG)
        marks = sys.argv[2]
        @strato.remote
        def long_call():
            open(os.path.join(marks, "started"), "w").close()
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                open(os.path.join(marks, "cancelled"), "w").close()
                raise
        @strato.remote(num_cpus=0)
        def durable():
            time.sleep(2)
            open(os.path.join(marks, "durable-done"), "w").close()
        durable.spawn()
        strato.get(long_call.remote())
    """)
    proc = subprocess.Popen([sys.executable, str(script), str(config), str(marks)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: (marks / "started").exists(), 60, "the call to start")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in out
    _wait(lambda: (marks / "cancelled").exists(), 20, "the call to be cancelled")
    _wait(lambda: (marks / "durable-done").exists(), 20, "the durable call to finish")
    # the cluster is healthy: the next client runs work
    check = write_script(home / "after.py", """
        strato.init(cluster=CONFIG)
        print("after", strato.get(strato.remote(lambda: 5).remote()))
        strato.shutdown()
    """)
    assert "after 5" in ok(run_client(check, config))


def test_reconnect_resumes_gets_and_a_lost_session_is_released(first_client, config):
    ok(first_client)
    strato.init(cluster=str(config))
    try:
        core = strato.runtime.core.current()

        @strato.remote
        def slow():
            time.sleep(1.0)
            return "done"

        kept = strato.put(b"x" * 300_000)   # in the head's store
        ref = slow.remote()
        old = core.conn
        old.sock.shutdown(socket.SHUT_RDWR)   # the tunnel breaks mid-get
        assert strato.get(ref, timeout=30) == "done"
        assert core.conn is not old and strato.get(kept) == b"x" * 300_000
        with HeadClient(_head_dir(config)) as head:
            assert head.activity()["sessions"] >= 1
    finally:
        strato.shutdown()

    # a session that vanishes (no goodbye) is kept for the grace period, then released
    script = write_script(config.parent / "vanish.py", """
        strato.init(cluster=CONFIG)
        ref = strato.put(b"y" * 300_000)
        print("PUT", flush=True)
        os._exit(0)
    """)
    ok(run_client(script, config))
    with HeadClient(_head_dir(config)) as head:
        assert head.activity()["sessions_in_grace"] >= 1
        _wait(lambda: head.activity()["sessions_in_grace"] == 0, GRACE_S + 10,
              "the lost session to be released")
        activity = head.activity()
        assert activity["sessions"] == 0 and "last_active" in activity


def test_endpoint_refuses_garbage_wrong_tokens_and_other_versions(first_client, config,
                                                                  tmp_path, monkeypatch):
    ok(first_client)
    info = _head_info(config)
    port = info["client_port"]
    token = StateDB().token("client-test")
    canary = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    import pickle
    evil = pickle.dumps([Evil()])
    frame = struct.pack("<I", len(evil)) + evil

    def answer(first: bytes, then: bytes = b"") -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(first + then)
            data = b""
            while True:
                part = s.recv(65536)
                if not part:
                    return data   # the head closed the connection
                data += part

    assert answer(b"\xff" * 64) == b""                      # garbage: closed, no answer
    assert answer(frame) == b""                             # a pickle first: never loaded
    bad = handshake.encode({"token": "wrong", "session": "s", "versions": {}})
    reply = answer(bad, frame)
    assert b"wrong cluster token" in reply
    assert not canary.exists()
    assert token not in reply.decode(errors="replace")
    # the client's own check names both sides before any call
    with socket.create_connection(("127.0.0.1", port)) as s, \
            pytest.raises(AuthenticationError):
        handshake.client_handshake(s, "wrong", "s")
    real = handshake.local_versions()
    monkeypatch.setattr(handshake, "local_versions", lambda: {**real, "python": "3.9"})
    with pytest.raises(VersionMismatchError) as err:
        strato.init(cluster=str(config))
    assert f"python 3.9 here vs {real['python']} on the cluster" in str(err.value)
    assert not strato.is_initialized()
    monkeypatch.undo()
    # the node is unharmed
    assert os.path.exists(info["socket"])
    with HeadClient(_head_dir(config)) as head:
        assert all(n["alive"] for n in head.nodes())


def test_a_cluster_that_cannot_come_up_gives_the_launchers_error(home):
    bad = home / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "cluster_name": "client-bad", "provider": {"type": "local"},
        "available_node_types": {"head": {"resources": {"CPU": 1}}},
        "head_node_type": "head", "head_setup_commands": ["echo broken setup >&2; exit 3"]}))
    try:
        with pytest.raises(LauncherError) as err:
            strato.init(cluster=str(bad))
        assert "exit 3" in str(err.value) and "broken setup" in str(err.value)
        assert not strato.is_initialized()
    finally:
        reconcile.down(bad, yes=True)


def test_strato_run_attaches_a_local_script(first_client, config, tmp_path):
    ok(first_client)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        import strato
        strato.init()   # `strato run` attached this process already: same session
        @strato.remote
        def hello(who):
            return f"hello {who}"
        print(strato.get(hello.remote(sys.argv[1])), sys.argv[2:])
    """))
    res = subprocess.run([sys.executable, "-m", "strato.cli", "run", str(config), str(script),
                          "world", "--flag"], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hello world ['--flag']" in res.stdout
