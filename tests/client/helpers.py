"""What the serverless client's tests share: client scripts run as their own processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# what every client script starts with: its cluster config comes as argv[1]. ``say`` writes
# a whole line in one write: print() writes its pieces one by one, and the workers' echoed
# prints (another thread) can land between them, splitting a line the test then parses.
PRELUDE = ("import json, os, sys, time\nimport strato\nCONFIG = sys.argv[1]\n"
           "def say(*parts):\n"
           "    sys.stdout.write(' '.join(map(str, parts)) + '\\n')\n"
           "    sys.stdout.flush()\n")


def write_script(path: Path, body: str) -> Path:
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def run_client(script: Path, config: Path, *args: str, timeout: float = 90,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a client script to the end (killed at ``timeout``); output captured."""
    proc = subprocess.Popen([sys.executable, str(script), str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=script.parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{script.name} did not finish in {timeout}s:\n{out}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def said(out: str, tag: str) -> str:
    """The rest of the line a script wrote with ``say(tag, ...)``."""
    for line in out.splitlines():
        if line.startswith(tag + " "):
            return line[len(tag) + 1:]
    raise AssertionError(f"no line starting {tag!r} in:\n{out}")


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout
    return result.stdout
