"""``python -m strato.launcher.monitor``: the autoscaler process beside the head.

A thin entry point: it rebuilds the cluster from the spec ``strato up`` wrote and runs
``autoscaler.loop.Autoscaler`` (demand-driven launches, idle scale-down, replacement of
preempted / dead / lost workers, capacity fallback; see that module) every
``autoscaler.tick_seconds``. Decisions are logged to ``autoscaler-events.jsonl`` in the
cluster's log directory and echoed to stdout (``monitor.log``).

Where it runs (``provider.monitor`` or env ``STRATO_MONITOR``):

- ``local`` (default when the nodes are processes on this machine): here, same
  ``$STRATO_HOME``.
- ``head`` (default otherwise): on the head, started by ``up`` with a spec file, the SSH
  key and ``STRATO_TOKEN`` in its environment, and copies of the provider's local state
  (``monitor_state_files``). On a fixed pool (SSH hosts) it only restarts runtimes (it
  never claims hosts the launcher does not know). On a cloud the head uses credentials
  of its own that ``up`` set up (``prepare``): an AWS instance profile allowed only the
  EC2 calls the monitor makes, a GCP service account with the compute scope; tests
  against moto or the GCE fake hand it an endpoint (``STRATO_MONITOR_ENV``) or use
  ``local`` or ``off``.
- ``off``: no monitor.

``start_monitor`` / ``stop_monitor`` below are the launcher's side: ``up`` and ``down``
deploy and stop this process with them; ``set_autostop`` changes a running monitor's
autostop (``strato.init(cluster=..., autostop=...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from strato.exceptions import LauncherError
from strato.launcher import bootstrap
from strato.launcher.autoscaler import autostop
from strato.launcher.autoscaler.events import EventLog
from strato.launcher.autoscaler.head_view import HeadRuntime
from strato.launcher.autoscaler.loop import Autoscaler
from strato.launcher.cluster import Cluster
from strato.launcher.config import AutostopConfig, load_config_from_dict
from strato.launcher.console import say
from strato.launcher.runner import CommandRunner, shell_path
from strato.localfiles import write_secret
from strato.providers.base import Node, NodeKind
from strato.ssh import ADDRESS_MAP_ENV, ADDRESS_MAP_STRICT_ENV

HEAD = NodeKind.HEAD.value
WORKER = NodeKind.WORKER.value


def build(cluster: Cluster, spec: dict, autostop_file: Path | None = None) -> Autoscaler:
    """The autoscaler for the cluster ``up`` described in ``spec``, attached to its head;
    ``autostop_file``: where ``set_autostop`` overrides the config's autostop."""
    def head_temp_dir() -> str:
        return cluster.temp_dir_path(cluster.require_head())

    events = EventLog(cluster.state.log_dir(cluster.name) / "autoscaler-events.jsonl",
                      echo=lambda line: print(line, flush=True))
    return Autoscaler(cluster, runtime=HeadRuntime(head_temp_dir, cluster.token),
                      events=events, head_address=spec["head_address"],
                      min_workers=dict(spec.get("min_workers") or {}),
                      autostop_file=autostop_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strato.launcher.monitor")
    parser.add_argument("--spec", required=True, help="JSON written by `strato up`")
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    config = load_config_from_dict(spec["config"], source=args.spec)
    cluster = Cluster(config, echo=True, overrides=spec)
    cluster.token = os.environ.get("STRATO_TOKEN") or None
    autoscaler = build(cluster, spec, Path(args.spec).parent / autostop.OVERRIDE_FILE)
    signal.signal(signal.SIGTERM, lambda *_: autoscaler.stop.set())
    signal.signal(signal.SIGINT, lambda *_: autoscaler.stop.set())
    pid_file = Path(args.pid_file)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pid_file)
    setting = autoscaler.autostop_setting()
    print(f"{time.strftime('%H:%M:%S')} monitor of cluster {cluster.name!r} started "
          f"(autoscaler, pid {os.getpid()}, tick {autoscaler.tick_seconds:g}s, autostop "
          f"{autostop.describe(setting.idle_minutes * 60) + ' idle' if setting else 'off'})",
          flush=True)
    try:
        autoscaler.run()
    finally:
        autoscaler.close()
        if isinstance(autoscaler.runtime, HeadRuntime):
            autoscaler.runtime.close()
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


# ---------------------------------------------------------------- deploying it (launcher side)
def monitor_runner(cluster: Cluster, head: Node, *,
                   connect_timeout: float | None = None) -> tuple[CommandRunner, str]:
    """Where the monitor lives: the head's runner (mode head) or a local one, and its dir."""
    mdir = cluster.monitor_dir(head)
    if cluster.monitor_mode == "head":
        return cluster.runner(head, echo=False, connect_timeout=connect_timeout), mdir
    Path(mdir).mkdir(parents=True, exist_ok=True, mode=0o700)
    runner = cluster.local_runner("monitor", Path(mdir))
    runner.sink.echo = False
    return runner, mdir


def stop_monitor(cluster: Cluster, head: Node, *,
                 connect_timeout: float | None = None) -> bool:
    """Stop the monitor (by its pid file) and wait until it has exited.

    Returns True when it is known to be stopped (or not running, or ``monitor: off``),
    False when that could not be confirmed (the head could not be reached).
    """
    if cluster.monitor_mode == "off":
        return True
    try:
        runner, mdir = monitor_runner(cluster, head, connect_timeout=connect_timeout)
        code, tail = runner.run(bootstrap.render("stop_monitor.sh",
                                                 pid_file=shell_path(f"{mdir}/monitor.pid")),
                                check=False, quiet=True, timeout=30)
    except LauncherError as e:
        say(f"[yellow]could not stop the monitor: {e}[/]")
        return False
    if code != 0:
        say(f"[yellow]could not stop the monitor (exit {code}): "
            f"{(tail.strip().splitlines() or [''])[-1]}[/]")
    return code == 0


def start_monitor(cluster: Cluster, head: Node, head_address: str,
                  min_workers: dict[str, int]) -> None:
    """Start the process that keeps ``min_workers`` (beside the head, or here)."""
    mode = cluster.monitor_mode
    if mode == "off":
        return
    runner, mdir = monitor_runner(cluster, head)
    spec: dict[str, Any] = {
        "config": cluster.config.to_dict(), "head_address": head_address,
        "min_workers": min_workers,
        "launch_hash": {t: cluster.launch_hash(t) for t in cluster.config.available_node_types},
        "setup_hash": {f"{k}:{t}": cluster.setup_hash(t, head=k == HEAD)
                       for t in cluster.config.available_node_types for k in (HEAD, WORKER)},
        "venv": bootstrap.venv_dir() if not cluster.is_local else None,
        "key_path": cluster.key_path(),
        "owner": cluster.owner,  # the nodes it creates are this owner's too
        "ssh_user": cluster.facts.get("ssh_user") or cluster.config.auth.ssh_user,
        # prepare()'s facts (the SSH public key among them): every node the monitor
        # creates must let the head in, like those `up` created (the monitor never prepares)
        "facts": dict(cluster.facts),
    }
    env = {"STRATO_TOKEN": cluster.token or ""}
    for name in (ADDRESS_MAP_ENV, ADDRESS_MAP_STRICT_ENV):  # the tests' address seam
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(_monitor_extra_env())
    with tempfile.TemporaryDirectory(prefix="strato-monitor-") as tmp:
        if mode == "head":
            python = cluster.runtime_python(head.node_type or "")
            env["STRATO_HOME"] = f"{mdir}/home"
            _prepare_head_monitor(cluster, head, runner, mdir, spec, Path(tmp))
        else:
            python = shlex.quote(sys.executable)
            env["STRATO_HOME"] = str(cluster.state.home)
        spec_file = Path(tmp) / "spec.json"
        write_secret(spec_file, json.dumps(spec, indent=1, default=str))
        runner.put(spec_file, f"{mdir}/spec.json")
        # an earlier init(autostop=...) no longer applies: the config's autostop does
        autostop.write_override(Path(tmp) / autostop.OVERRIDE_FILE, cluster.config.autostop)
        runner.put(Path(tmp) / autostop.OVERRIDE_FILE, f"{mdir}/{autostop.OVERRIDE_FILE}")
    script = bootstrap.render(
        "start_monitor.sh", monitor_dir=shell_path(mdir), python=python,
        stop_monitor=bootstrap.render("stop_monitor.sh",
                                      pid_file=shell_path(f"{mdir}/monitor.pid")))
    _, tail = runner.run(script, env=env, quiet=True, timeout=60)
    say(f"monitor started ({mode}): {tail.splitlines()[-1] if tail else ''}")


def set_autostop(cluster: Cluster, head: Node, setting: AutostopConfig | None) -> None:
    """Make the running monitor use ``setting`` (None: off) instead of the config's
    autostop, from its next tick until the next ``up``."""
    if cluster.monitor_mode == "off":
        raise LauncherError(f"cluster {cluster.name!r}: autostop needs the monitor, which is "
                            "off (provider.monitor / STRATO_MONITOR)")
    if setting is not None and not cluster.provider.can_create_nodes:
        say(f"[yellow]autostop ignored: {cluster.kind} hosts are claimed, not created[/]")
        return
    runner, mdir = monitor_runner(cluster, head)
    with tempfile.TemporaryDirectory(prefix="strato-autostop-") as tmp:
        path = Path(tmp) / autostop.OVERRIDE_FILE
        autostop.write_override(path, setting)
        runner.put(path, f"{mdir}/{autostop.OVERRIDE_FILE}")


MONITOR_ENV = "STRATO_MONITOR_ENV"


def _monitor_extra_env() -> dict[str, str]:
    """Extra environment for the monitor process, from ``STRATO_MONITOR_ENV`` (a JSON
    object). For development and tests: e.g. a cloud endpoint and credentials that the
    head would otherwise get from its instance profile / service account."""
    raw = os.environ.get(MONITOR_ENV, "").strip()
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except ValueError as e:
        raise LauncherError(f"{MONITOR_ENV} must be a JSON object of strings: {e}") from e
    if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise LauncherError(f"{MONITOR_ENV} must be a JSON object of strings")
    return extra


def _prepare_head_monitor(cluster: Cluster, head: Node, runner: CommandRunner, mdir: str,
                          spec: dict[str, Any], tmp: Path) -> None:
    """What a monitor on the head needs that lives here: key, provider state, mounts."""
    config = spec["config"]
    # file mounts were copied to the head at their remote paths: sync workers from there
    config["file_mounts"] = {remote: remote for remote in config.get("file_mounts", {})}
    # the head's own cloud credentials (instance profile / service account), not a key
    # file of this machine's
    config.get("provider", {}).pop("credentials_file", None)
    key = cluster.key_path()
    if key:
        runner.put(Path(key).expanduser(), f"{mdir}/key")
        spec["key_path"] = f"{mdir}/key"
        config.setdefault("auth", {})["ssh_private_key"] = f"{mdir}/key"
    if not cluster.config.runtime_python_for(head.node_type or ""):
        wheel = bootstrap.ensure_wheel()  # for the workers the monitor will set up
        spec["wheel"] = f"{mdir}/wheels/{wheel.name}"
        runner.put(wheel, spec["wheel"])
    for local, relative in cluster.provider.monitor_state_files().items():
        runner.put(local, f"{mdir}/home/{relative}")  # e.g. a copy of the SSH host claims
    pins = cluster.host_keys_path()
    if pins.exists():  # the workers' keys as pinned here: the monitor verifies them too
        runner.put(pins, f"{mdir}/home/{pins.parent.name}/{pins.name}")
    for path in cluster.state.ca_paths(cluster.name):
        if path.exists():  # the cluster CA: workers the monitor starts get certificates from it
            runner.put(path, f"{mdir}/home/{path.parent.name}/{path.name}")


if __name__ == "__main__":
    sys.exit(main())
