"""Where a machine's runtime processes leave notes for each other: node files, tokens."""

from __future__ import annotations

import json
import os
import pwd
import re
import stat

import psutil


def user_temp_dir(user: str | None = None) -> str:
    """``/tmp/strato-runtime.<user>``: one runtime dir per user, never a shared one (not
    "/tmp/strato": a folder named like the package in the cwd would shadow an editable
    install; the ``.`` keeps it apart from the launcher's ``/tmp/strato-<cluster>``)."""
    if user is None:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
    return os.path.join("/tmp", "strato-runtime." + re.sub(r"[^A-Za-z0-9_.-]", "_", user))


DEFAULT_TEMP_DIR = user_temp_dir()


class ForeignDirError(PermissionError):
    """A runtime dir that belongs to another user (never reused: its owner could read
    our sockets and token, or plant node files)."""


def ensure_private_dir(path: str) -> None:
    """Create ``path`` 0700 (parents as needed); refuse one owned by another user or a
    symlink; tighten our own if others may enter it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ForeignDirError(f"strato: runtime dir {path} is not a plain directory; "
                              "refusing to use it (pass another --temp-dir)")
    if st.st_uid != os.getuid():
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = "?"
        raise ForeignDirError(
            f"strato: runtime dir {path} belongs to uid {st.st_uid} ({owner}), not to you "
            f"(uid {os.getuid()}); refusing to use another user's dir: pass another "
            "--temp-dir (or STRATO_TEMP_DIR), or have it removed")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def node_files(temp_dir: str, *, dead: bool = False) -> list[dict]:
    """Node files of live runtime processes under ``temp_dir``, newest first (with
    ``dead``: those whose process is gone, e.g. killed, so their leftovers can go)."""
    out = []
    nodes_dir = os.path.join(temp_dir, "nodes")
    try:
        names = os.listdir(nodes_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(nodes_dir, name)
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(info.get("pid", -1)) == dead:
            continue
        info["_file"] = path
        out.append(info)
    out.sort(key=lambda i: i.get("started", 0), reverse=True)
    return out


def read_token(info: dict) -> str:
    with open(info["token_file"]) as f:
        return f.read().strip()
