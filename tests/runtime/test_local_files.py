"""A node's local files: a per-user runtime dir made 0700 (another user's is refused),
the agent's socket and token file 0600, and no cluster token in user tasks' environment."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest

from strato.runtime.control import StartError, start_node
from strato.runtime.session import DEFAULT_TEMP_DIR, node_files, user_temp_dir

pytestmark = pytest.mark.timeout(90)


def test_the_default_runtime_dir_is_the_users_own():
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    assert DEFAULT_TEMP_DIR == f"/tmp/strato-runtime.{me}" == user_temp_dir()
    assert user_temp_dir("ubuntu") != user_temp_dir("alice")
    assert not user_temp_dir("x/../y").count("/") > 2  # a name never escapes /tmp


def test_another_users_runtime_dir_is_refused():
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    temp_dir = tempfile.mkdtemp(prefix="strato-foreign-")
    try:
        os.chmod(temp_dir, 0o777)
        os.chown(temp_dir, 65534, 65534)  # someone else's, e.g. made first in a shared /tmp
        with pytest.raises(StartError) as info:
            start_node(head=True, temp_dir=temp_dir, port=0, node_ip="127.0.0.1", num_cpus=1)
        assert temp_dir in str(info.value) and "uid 65534" in str(info.value)
        assert os.listdir(temp_dir) == []  # nothing was created in it
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_private_modes_and_no_token_in_task_environments(monkeypatch):
    import strato

    temp_dir = os.path.join(tempfile.mkdtemp(prefix="strato-lf-"), "rt")  # made by start
    secret = "tok-" + os.urandom(12).hex()
    monkeypatch.setenv("STRATO_TOKEN", secret)  # as `strato start` gets it from the launcher
    old_umask = os.umask(0o022)
    try:
        strato.init(num_cpus=1, temp_dir=temp_dir)

        @strato.remote
        def environment() -> dict[str, str]:
            return dict(os.environ)

        env = strato.get(environment.remote(), timeout=60)
        assert "STRATO_TOKEN" not in env and secret not in env.values()
        assert env["STRATO_AGENT_SOCKET"]  # tasks reach their agent by its socket

        assert stat.S_IMODE(os.stat(temp_dir).st_mode) == 0o700
        [info] = node_files(temp_dir)
        assert stat.S_IMODE(os.stat(info["socket"]).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(info["token_file"]).st_mode) == 0o600
        with open(info["token_file"]) as f:
            assert f.read().strip() == secret
    finally:
        os.umask(old_umask)
        strato.shutdown()
        shutil.rmtree(os.path.dirname(temp_dir), ignore_errors=True)
