"""Cluster commands of the `strato` CLI: thin wrappers over ``strato.launcher.reconcile``
(up, down) and ``strato.launcher.commands`` (everything else).

Config warnings are printed first; a ``ConfigError`` or ``LauncherError`` becomes a clear
message and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from strato.exceptions import ConfigError, LauncherError

F = TypeVar("F", bound=Callable[..., Any])
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

config_argument = click.argument("config", type=click.Path(dir_okay=False))
yes_option = click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")


def force_option(what: str) -> Callable[[F], F]:
    """``--force``: go on although another owner's nodes carry the cluster's name."""
    return click.option("--force", is_flag=True,
                        help=f"When nodes of another owner have this cluster name: {what}.")


def _handle_errors(fn: F) -> F:
    """Print launcher errors as one message (exit 1); config errors list every problem."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            _err.print("[bold red]strato: invalid cluster config[/]", markup=True)
            _err.print(str(e), markup=False)
            sys.exit(2)
        except LauncherError as e:
            _err.print(f"strato: error: {e}", markup=False, style="red")
            sys.exit(1)
        except KeyboardInterrupt:
            _err.print("strato: interrupted", style="red")
            sys.exit(130)
    return wrapper  # type: ignore[return-value]


def _warn_config(path: str, notes: bool = False) -> None:
    """Print the config's warnings (Ray-only keys, likely mistakes) once per command, and
    with ``notes`` what strato translated from Ray's idioms (legacy keys, spot settings)."""
    from strato.launcher.config import load_config

    config = load_config(path)
    for warning in config.warnings:
        _err.print(f"strato: warning: {warning}", markup=False, style="yellow")
    for note in config.notes if notes else ():
        _err.print(f"strato: note: {note}", markup=False)


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_table(info: dict[str, Any]) -> Table:
    """The rich table ``strato status`` prints: one row per node."""
    title = f"cluster {info['cluster']} ({info['provider']})"
    if info.get("head_address"):
        title += f" - head {info['head_address']}"
    table = Table(title=title, title_justify="left")
    for col in ("node", "type", "kind", "state", "ip", "spot", "uptime", "price"):
        table.add_column(col)
    for n in info["nodes"]:
        state = n["status"] if n["state"] == "running" and n.get("status") else n["state"]
        if n.get("runtime") and n["runtime"] != "alive":
            state += f" (runtime {n['runtime']})"
        price = n.get("price_per_hour")
        table.add_row(n["id"], n["type"], n["kind"] or "", state, n["ip"] or "",
                      "yes" if n["spot"] else "no", _fmt_uptime(n.get("uptime")),
                      "-" if price is None else f"${price:.4g}/h")
    return table


def cost_line(cost: dict[str, Any] | None) -> str | None:
    """``cost: $2.012/h now, $0.0345 so far`` (``~`` marks an estimate)."""
    if not cost:
        return None
    mark = " (estimate)" if cost.get("estimated") else ""
    unpriced = cost.get("unpriced_nodes") or 0
    extra = f"; {unpriced} node(s) without a known price" if unpriced else ""
    return (f"cost: ${cost['per_hour']:.4g}/h now, ${cost['so_far']:.4g} so far"
            f"{mark}{extra}")


def autostop_line(auto: dict[str, Any] | None) -> str | None:
    """``autostop in 7m (terminate)``, or when it would start counting."""
    if not auto:
        return None
    from strato.launcher.autoscaler.autostop import describe

    how = "terminate" if auto.get("down") else "stop"
    after = describe(auto["idle_minutes"] * 60)
    if auto.get("in_seconds") is not None:
        return f"autostop in {describe(auto['in_seconds'])} ({how}; after {after} idle)"
    why = "active now" if auto.get("active") else "idleness unknown"
    return f"autostop after {after} idle ({how}; {why})"


def register(cli: click.Group) -> None:
    """Add the cluster commands to the `strato` group."""

    @cli.command()
    @config_argument
    @yes_option
    @click.option("--min-workers", type=click.IntRange(min=0),
                  help="Override min_workers of every worker node type.")
    @click.option("--no-restart", is_flag=True,
                  help="Do not restart runtimes that are running (setup still runs).")
    @click.option("--restart-only", is_flag=True,
                  help="Skip setup; only restart the runtime on every node.")
    @click.option("--no-config-cache", is_flag=True,
                  help="Do not reuse what earlier `up`s remembered in $STRATO_HOME/state.db "
                       "(the provider's facts: key pair, security group, subnets, firewall "
                       "rules, SSH user; the head's address): learn them anew.")
    @force_option("create this owner's nodes beside them, leaving theirs alone")
    @_handle_errors
    def up(config: str, yes: bool, min_workers: int | None, no_restart: bool,
           restart_only: bool, no_config_cache: bool, force: bool) -> None:
        """Create or update a cluster (idempotent)."""
        from strato.launcher import reconcile

        _warn_config(config, notes=True)
        reconcile.up(config, yes=yes, min_workers_override=min_workers,
                     no_restart=no_restart, restart_only=restart_only,
                     no_config_cache=no_config_cache, force=force)

    @cli.command()
    @config_argument
    @yes_option
    @click.option("--workers-only", is_flag=True, help="Keep the head node.")
    @force_option("terminate them too")
    @_handle_errors
    def down(config: str, yes: bool, workers_only: bool, force: bool) -> None:
        """Terminate every node of the cluster (found by tags) and forget it."""
        from strato.launcher import reconcile

        _warn_config(config)
        reconcile.down(config, yes=yes, workers_only=workers_only, force=force)

    @cli.command(name="exec")
    @config_argument
    @click.argument("cmd")
    @click.option("--node", default="head", show_default=True,
                  help="head, all, or a node's IP.")
    @_handle_errors
    def exec_command(config: str, cmd: str, node: str) -> None:
        """Run a shell command on cluster nodes; its exit code is propagated."""
        from strato.launcher import commands

        _warn_config(config)
        sys.exit(commands.exec_(config, cmd, node=node))

    @cli.command(context_settings={"ignore_unknown_options": True})
    @config_argument
    @click.argument("script", type=click.Path(exists=True, dir_okay=False))
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--spot-recovery", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Relaunch the job up to N times (with STRATO_RESUME=1) when it fails "
                       "after a node was preempted or lost.")
    @_handle_errors
    def submit(config: str, script: str, args: tuple[str, ...], spot_recovery: int) -> None:
        """Upload SCRIPT to the head and run it there (args after `--` go to it)."""
        from strato.launcher import commands

        _warn_config(config)
        sys.exit(commands.submit(config, script, list(args), spot_recovery=spot_recovery))

    @cli.command()
    @config_argument
    @_handle_errors
    def attach(config: str) -> None:
        """Open an interactive shell on the head."""
        from strato.launcher import commands

        sys.exit(commands.attach(config))

    @cli.command(name="rsync-up")
    @config_argument
    @click.argument("source")
    @click.argument("target")
    @click.option("--node", default="head", show_default=True, help="head, all, or an IP.")
    @_handle_errors
    def rsync_up(config: str, source: str, target: str, node: str) -> None:
        """Copy a local file or directory to the cluster."""
        from strato.launcher import commands

        commands.rsync_up(config, source, target, node=node)

    @cli.command(name="rsync-down")
    @config_argument
    @click.argument("source")
    @click.argument("target")
    @click.option("--node", default="head", show_default=True, help="head or an IP.")
    @_handle_errors
    def rsync_down(config: str, source: str, target: str, node: str) -> None:
        """Copy a file or directory from a cluster node to this machine."""
        from strato.launcher import commands

        commands.rsync_down(config, source, target, node=node)

    @cli.command(name="get-head-ip")
    @config_argument
    @_handle_errors
    def get_head_ip(config: str) -> None:
        """Print the head node's address."""
        from strato.launcher import commands

        click.echo(commands.get_head_ip(config))

    @cli.command(name="get-worker-ips")
    @config_argument
    @_handle_errors
    def get_worker_ips(config: str) -> None:
        """Print the live workers' addresses, one per line."""
        from strato.launcher import commands

        for ip in commands.get_worker_ips(config):
            click.echo(ip)

    @cli.command()
    @config_argument
    @click.option("-n", "--lines", default=100, show_default=True, type=click.IntRange(min=0),
                  help="Lines of the log to show first.")
    @click.option("--no-follow", is_flag=True, help="Print the last lines and exit.")
    @_handle_errors
    def monitor(config: str, lines: int, no_follow: bool) -> None:
        """Follow the autoscaler's log (on the head, or here); Ctrl-C to stop."""
        from strato.launcher import commands

        sys.exit(commands.monitor(config, lines, follow=not no_follow))

    @cli.command(name="kill-random-node")
    @config_argument
    @yes_option
    @click.option("--hard", is_flag=True,
                  help="Terminate the machine at the provider instead of stopping its runtime.")
    @_handle_errors
    def kill_random_node(config: str, yes: bool, hard: bool) -> None:
        """Kill a random worker (never the head), to test fault tolerance."""
        from strato.launcher import commands

        node = commands.kill_random_node(config, hard=hard, yes=yes)
        click.echo(f"killed {node.id} ({'machine terminated' if hard else 'runtime stopped'})")

    @cli.command(name="cluster-dump")
    @config_argument
    @click.option("-o", "--output", type=click.Path(dir_okay=False),
                  help="Archive to write (default: strato-dump-<cluster>-<time>.tar.gz here).")
    @_handle_errors
    def cluster_dump(config: str, output: str | None) -> None:
        """Collect every node's logs, status and autoscaler events into one .tar.gz
        (the cluster token and private keys redacted)."""
        from strato.launcher import dump

        click.echo(dump.cluster_dump(config, output))

    @cli.command()
    @config_argument
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_handle_errors
    def status(config: str, as_json: bool) -> None:
        """Show the cluster's nodes, runtime and recent events."""
        from strato.launcher import commands

        if not as_json:
            _warn_config(config)
        info = commands.status(config)
        if as_json:
            click.echo(json.dumps(info, indent=2, default=str))
            return
        _out.print(status_table(info))
        line = cost_line(info.get("cost"))
        if line:
            _out.print(line, markup=False)
        rt = info["runtime"]
        _out.print(f"runtime: {'reachable' if rt['reachable'] else 'not reachable'}, "
                   f"{rt['nodes_alive']} node(s) alive; monitor: {info['monitor']}")
        line = autostop_line(info.get("autostop"))
        if line:
            _out.print(line, markup=False)
        for d in rt.get("demand") or []:
            _out.print(f"  pending: {d.get('count')} x {d.get('shape')}"
                       + (" (infeasible)" if d.get("infeasible") else ""))
        problems = (info.get("autoscaler") or {}).get("launch_problems") or []
        if problems:
            _out.print("why launches failed (latest):")
            for ev in problems[-5:]:
                when = time.strftime("%H:%M:%S", time.localtime(ev.get("time", 0)))
                _out.print(f"  {when} {ev.get('kind')}: {ev.get('message')}", markup=False)
        if info["events"]:
            _out.print("recent events:")
            for ev in info["events"][-10:]:
                when = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
                who = f" {ev['node']}" if ev["node"] else ""
                _out.print(f"  {when}{who}: {ev['message']}", markup=False)

    @cli.command()
    @config_argument
    @click.option("--node", default=None, help="A node's IP or id (default: the head).")
    @click.option("-n", "--lines", default=200, show_default=True, help="Lines per log file.")
    @_handle_errors
    def logs(config: str, node: str | None, lines: int) -> None:
        """Show setup and runtime logs of a node."""
        from strato.launcher import commands

        click.echo(commands.logs(config, node=node, lines=lines))
