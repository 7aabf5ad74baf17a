"""Pieces of bootstrap and local state that need no cluster: templates, wheel, venv, state."""

from __future__ import annotations

import importlib.resources
import re
import stat
import subprocess
import threading

import pytest

from strato.launcher import bootstrap
from strato.launcher.runner import LocalRunner, OutputSink
from strato.launcher.state import StateDB

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("strato_home")]


def test_every_template_renders_and_is_valid_bash():
    names = [p.name for p in importlib.resources.files("strato.templates").iterdir()
             if p.name.endswith(".sh")]
    assert {"install_strato.sh", "start_node.sh", "stop_node.sh"} <= set(names)
    for name in names:
        text = importlib.resources.files("strato.templates").joinpath(name).read_text()
        slots = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", text))
        script = bootstrap.render(name, **{s: "x" for s in slots})
        assert "{{" not in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, name
    with pytest.raises(KeyError):
        bootstrap.render("start_node.sh", python="python3")


def test_wheel_is_built_once_and_installed_once_into_a_shared_venv(tmp_path):
    wheel = bootstrap.ensure_wheel()
    assert wheel.name.startswith("strato-") and bootstrap.ensure_wheel() == wheel
    venv = tmp_path / "nfs-home" / ".strato" / "venv-test"
    outputs: dict[int, list[str]] = {}

    def install(i: int) -> None:  # two nodes sharing one home directory, at once
        lines: list[str] = []
        sink = OutputSink(f"n{i}", None, console_print=lambda _, line: lines.append(line))
        runner = LocalRunner(f"n{i}", tmp_path / f"n{i}", sink)
        runner.wait_ready(0)
        # offline: the test's venv borrows this interpreter's packages for dependencies
        bootstrap.install_strato(runner, wheel, venv=str(venv), scratch=str(tmp_path / f"n{i}"),
                                 pip_args="--no-deps --no-index",
                                 venv_args="--system-site-packages")
        outputs[i] = lines

    threads = [threading.Thread(target=install, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    said = sorted(line for lines in outputs.values() for line in lines)
    assert len(said) == 2
    assert said[0].startswith("installed ") and "already installed" in said[1]
    where = subprocess.run([str(venv / "bin/python"), "-c", "import strato; print(strato.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv))


def test_state_keeps_secrets_private_and_forgets_clusters(strato_home):
    db = StateDB()
    assert db.get("c1") is None and not db.path.exists()  # reading creates nothing
    db.upsert("c1", provider="local", config_path="/x.yaml", config_hash="h")
    token = db.ensure_token("c1")
    assert db.ensure_token("c1") == token
    assert stat.S_IMODE(db.token_path("c1").stat().st_mode) == 0o600
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600
    db.set_head("c1", "10.0.0.1:6380")
    db.add_event("c1", "created head", node="n1")
    record = db.get("c1")
    assert record.head_address == "10.0.0.1:6380" and token not in repr(record)
    assert [e["message"] for e in db.events("c1")] == ["created head"]

    log = db.log_dir("c1") / "n1.log"
    sink = OutputSink("n1", log, secrets=[token], console_print=lambda *_: None)
    sink.line(f"token: {token}")
    assert log.read_text() == "token: ***\n"

    db.delete("c1")
    assert db.get("c1") is None and db.events("c1") == []
    assert not db.token_path("c1").exists() and not (strato_home / "logs" / "c1").exists()
