"""Copying files and directories to and from a node over SFTP (like ``cp -rT``)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from pathlib import Path

import paramiko

from strato.exceptions import LauncherError
from strato.ssh.connect import DEFAULT_CONNECT_TIMEOUT, SSHTarget, connected


class FileTransferError(LauncherError):
    """Copying files to or from a node over SFTP failed."""



# ---------------------------------------------------------------- files
def _remote_abspath(sftp: paramiko.SFTPClient, path: str) -> str:
    """Expand a leading ``~`` to the login's home, as a shell would."""
    if path == "~" or path.startswith("~/"):
        home = sftp.normalize(".")
        return posixpath.join(home, path[2:]) if path != "~" else home
    return path


def _remote_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    if path in ("", "/", "."):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode):
            return
        raise NotADirectoryError(f"{path} exists and is not a directory")
    except FileNotFoundError:
        pass
    _remote_makedirs(sftp, posixpath.dirname(path.rstrip("/")))
    try:
        sftp.mkdir(path)
    except OSError:  # created meanwhile by a concurrent copy?
        if not stat.S_ISDIR(sftp.stat(path).st_mode):
            raise


def _remote_remove(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError):
        sftp.remove(path)


def _put_one(sftp: paramiko.SFTPClient, local: Path, remote: str) -> None:
    if local.is_symlink():
        _remote_remove(sftp, remote)
        sftp.symlink(os.readlink(local), remote)
        return
    sftp.put(str(local), remote)
    sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))


def put(target: SSHTarget, local_path: str | os.PathLike, remote_path: str) -> None:
    """Copy a local file or directory to ``remote_path`` on the node (like ``cp -rT``).

    Parent directories are created; a directory's contents are merged into
    ``remote_path`` (existing files overwritten, extra ones kept); modes and symlinks are
    preserved; a leading ``~`` means the login's home.
    """
    local = Path(local_path).expanduser()
    if not local.exists() and not local.is_symlink():
        raise FileNotFoundError(f"put to {target.label}: no such local path {local}")
    client = connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            remote = _remote_abspath(sftp, remote_path).rstrip("/") or "/"
            if not local.is_dir() or local.is_symlink():
                _remote_makedirs(sftp, posixpath.dirname(remote))
                _put_one(sftp, local, remote)
                return
            _remote_makedirs(sftp, remote)
            for root, dirs, files in os.walk(local):
                rel = Path(root).relative_to(local).as_posix()
                rdir = remote if rel == "." else posixpath.join(remote, rel)
                for d in list(dirs):
                    src, dst = Path(root, d), posixpath.join(rdir, d)
                    if src.is_symlink():  # not descended by os.walk: copy the link itself
                        _put_one(sftp, src, dst)
                    else:
                        _remote_makedirs(sftp, dst)
                        sftp.chmod(dst, stat.S_IMODE(src.stat().st_mode))
                for name in files:
                    _put_one(sftp, Path(root, name), posixpath.join(rdir, name))
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: put {local} -> {remote_path} failed: {e}") from e


def _get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path) -> None:
    attrs = sftp.lstat(remote)
    mode = attrs.st_mode or 0
    if stat.S_ISLNK(mode):
        if local.is_symlink() or local.is_file():
            local.unlink()
        os.symlink(sftp.readlink(remote), local)
    elif stat.S_ISDIR(mode):
        local.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(remote):
            _get_tree(sftp, posixpath.join(remote, entry.filename), local / entry.filename)
        os.chmod(local, stat.S_IMODE(mode))
    else:
        sftp.get(remote, str(local))
        os.chmod(local, stat.S_IMODE(mode))


def get(target: SSHTarget, remote_path: str, local_path: str | os.PathLike) -> None:
    """Copy a file or directory from the node to ``local_path`` (like ``cp -rT``).

    Same rules as :func:`put`, in the other direction.
    """
    local = Path(local_path).expanduser()
    client = connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            remote = _remote_abspath(sftp, remote_path).rstrip("/") or "/"
            local.parent.mkdir(parents=True, exist_ok=True)
            _get_tree(sftp, remote, local)
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: get {remote_path} -> {local} failed: {e}") from e

