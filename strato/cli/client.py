"""`strato run`: a local script with a cluster attached (the serverless client)."""

from __future__ import annotations

import os
import runpy
import sys

import click


def register(cli: click.Group) -> None:
    @cli.command(context_settings={"ignore_unknown_options": True})
    @click.argument("config", type=click.Path(exists=True, dir_okay=False))
    @click.argument("script", type=click.Path(exists=True, dir_okay=False))
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--working-dir", type=click.Path(exists=True, file_okay=False),
                  help="Sync this directory to the cluster; tasks run in it.")
    def run(config: str, script: str, args: tuple[str, ...], working_dir: str | None) -> None:
        """Run SCRIPT here with the cluster of CONFIG attached (up first if needed).

        The script's remote calls run on the cluster; its own ``strato.init()`` (with or
        without ``cluster=``) attaches to the same session.
        """
        import strato
        from strato.client import CLUSTER_ENV, connect
        from strato.exceptions import StratoError

        config = os.path.abspath(config)
        os.environ[CLUSTER_ENV] = config
        try:
            connect(config, working_dir=working_dir)
        except StratoError as e:
            click.echo(f"strato run: {e}", err=True)
            sys.exit(1)
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        try:
            runpy.run_path(script, run_name="__main__")
        except KeyboardInterrupt:
            click.echo("strato run: interrupted; the session's calls were cancelled", err=True)
            sys.exit(130)
        finally:
            strato.shutdown()
