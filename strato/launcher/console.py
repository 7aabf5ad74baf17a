"""What the launcher tells the person at the terminal: ``strato: ...`` progress lines on
stdout, problems on stderr, and yes/no questions."""

from __future__ import annotations

import sys

from rich.console import Console

from strato.exceptions import LauncherError

__all__ = ["confirm", "console", "err_console", "say"]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """One progress line (rich markup allowed)."""
    console.print(f"[bold blue]strato[/]: {message}")


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` unless ``yes``; ``LauncherError`` when declined or not on a tty."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise LauncherError(f"{question} Pass -y / --yes to confirm when not on a terminal.")
    from rich.prompt import Confirm

    if not Confirm.ask(question, default=False):
        raise LauncherError("aborted")
