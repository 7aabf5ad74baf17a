"""Copying files and directories to and from a node over SFTP (like ``cp -rT``), leaving
out what a ``CopyFilter`` excludes (Ray's ``rsync_exclude`` / ``rsync_filter``)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import paramiko
import pathspec

from strato.exceptions import LauncherError
from strato.ssh.connect import DEFAULT_CONNECT_TIMEOUT, SSHTarget, connected


class FileTransferError(LauncherError):
    """Copying files to or from a node over SFTP failed."""



# ---------------------------------------------------------------- filters
class CopyFilter:
    """Which paths a directory copy leaves out, as rsync with Ray's ``rsync_exclude`` and
    ``rsync_filter`` would.

    ``exclude``: gitignore-style patterns, relative to the copied directory
    (``**/.git``, ``data/``, ``/build``, ``*.ckpt``). ``filter_files``: names of
    per-directory pattern files (``.gitignore``) looked up in the source tree as it is
    walked; each one's patterns apply to its own directory and below, a deeper file's
    match (negations too) deciding first (rsync's ``dir-merge``, git's rules). An
    excluded directory is not descended into. A file copied by name is never left out.
    """

    def __init__(self, exclude: Iterable[str] = (), filter_files: Iterable[str] = ()):
        self.exclude = tuple(exclude)
        self.filter_files = tuple(filter_files)
        self._spec = pathspec.GitIgnoreSpec.from_lines(self.exclude) if self.exclude \
            else None

    def __bool__(self) -> bool:
        return bool(self.exclude or self.filter_files)

    def __repr__(self) -> str:
        return f"CopyFilter(exclude={self.exclude!r}, filter_files={self.filter_files!r})"

    def walk(self, read: Callable[[str], str | None]) -> FilterWalk:
        """Start judging one tree; ``read(relative path)`` returns a filter file's text
        (None if absent), so the tree may be here or on a node."""
        return FilterWalk(self, read)

    def walk_local(self, root: str | os.PathLike[str]) -> FilterWalk:
        """Start judging the local tree at ``root``."""
        base = Path(root)

        def read(rel: str) -> str | None:
            try:
                return (base / rel).read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
        return self.walk(read)


class FilterWalk:
    """One tree being copied: remembers each directory's filter files as it is walked."""

    def __init__(self, copy_filter: CopyFilter, read: Callable[[str], str | None]):
        self.filter = copy_filter
        self._read = read
        self._chains: dict[str, list[tuple[str, pathspec.GitIgnoreSpec]]] = {}

    def _chain(self, rel_dir: str) -> list[tuple[str, pathspec.GitIgnoreSpec]]:
        """The pattern files in force in ``rel_dir`` ('' is the root), outermost first."""
        if rel_dir in self._chains:
            return self._chains[rel_dir]
        chain = [] if not rel_dir else list(self._chain(posixpath.dirname(rel_dir)))
        for name in self.filter.filter_files:
            text = self._read(posixpath.join(rel_dir, name) if rel_dir else name)
            if text:
                chain.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(text.splitlines())))
        self._chains[rel_dir] = chain
        return chain

    def excluded(self, rel: str, is_dir: bool) -> bool:
        """Whether ``rel`` (posix, relative to the copied directory) is left out."""
        if not self.filter:
            return False
        key = rel + "/" if is_dir else rel
        spec = self.filter._spec
        if spec is not None and spec.match_file(key):
            return True
        for where, own in reversed(self._chain(posixpath.dirname(rel))):
            verdict = own.check_file(key[len(where) + 1:] if where else key).include
            if verdict is not None:
                return verdict
        return False


NO_FILTER = CopyFilter()


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


def put(target: SSHTarget, local_path: str | os.PathLike, remote_path: str, *,
        copy_filter: CopyFilter = NO_FILTER) -> None:
    """Copy a local file or directory to ``remote_path`` on the node (like ``cp -rT``).

    Parent directories are created; a directory's contents are merged into
    ``remote_path`` (existing files overwritten, extra ones kept); modes and symlinks are
    preserved; a leading ``~`` means the login's home; what ``copy_filter`` excludes is
    left out.
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
            walk = copy_filter.walk_local(local)
            for root, dirs, files in os.walk(local):
                rel = Path(root).relative_to(local).as_posix()
                rel = "" if rel == "." else rel
                rdir = posixpath.join(remote, rel) if rel else remote
                for d in list(dirs):
                    src, dst = Path(root, d), posixpath.join(rdir, d)
                    if walk.excluded(posixpath.join(rel, d) if rel else d, True):
                        dirs.remove(d)
                    elif src.is_symlink():  # not descended by os.walk: copy the link itself
                        _put_one(sftp, src, dst)
                    else:
                        _remote_makedirs(sftp, dst)
                        sftp.chmod(dst, stat.S_IMODE(src.stat().st_mode))
                for name in files:
                    if not walk.excluded(posixpath.join(rel, name) if rel else name, False):
                        _put_one(sftp, Path(root, name), posixpath.join(rdir, name))
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: put {local} -> {remote_path} failed: {e}") from e


def _get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path,
              walk: FilterWalk | None = None, rel: str = "") -> None:
    attrs = sftp.lstat(remote)
    mode = attrs.st_mode or 0
    if walk is not None and rel and walk.excluded(rel, stat.S_ISDIR(mode)):
        return
    if stat.S_ISLNK(mode):
        if local.is_symlink() or local.is_file():
            local.unlink()
        os.symlink(sftp.readlink(remote), local)
    elif stat.S_ISDIR(mode):
        local.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(remote):
            _get_tree(sftp, posixpath.join(remote, entry.filename), local / entry.filename,
                      walk, posixpath.join(rel, entry.filename) if rel else entry.filename)
        os.chmod(local, stat.S_IMODE(mode))
    else:
        sftp.get(remote, str(local))
        os.chmod(local, stat.S_IMODE(mode))


def get(target: SSHTarget, remote_path: str, local_path: str | os.PathLike, *,
        copy_filter: CopyFilter = NO_FILTER) -> None:
    """Copy a file or directory from the node to ``local_path`` (like ``cp -rT``).

    Same rules as :func:`put`, in the other direction (filter files are read on the node).
    """
    local = Path(local_path).expanduser()
    client = connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            remote = _remote_abspath(sftp, remote_path).rstrip("/") or "/"
            local.parent.mkdir(parents=True, exist_ok=True)
            walk = None
            if copy_filter:
                def read(rel: str) -> str | None:
                    try:
                        with sftp.open(posixpath.join(remote, rel)) as f:
                            return f.read().decode("utf-8", errors="replace")
                    except OSError:
                        return None
                walk = copy_filter.walk(read)
            _get_tree(sftp, remote, local, walk)
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(
            f"node {target.label}: get {remote_path} -> {local} failed: {e}") from e



def read_from(target: SSHTarget, remote_path: str, offset: int,
              limit: int = 1 << 20) -> tuple[int, bytes] | None:
    """The file's size and up to ``limit`` bytes of it from ``offset`` (for following a
    log); None if there is no such file."""
    client = connected(target, DEFAULT_CONNECT_TIMEOUT)
    try:
        with client.open_sftp() as sftp:
            path = _remote_abspath(sftp, remote_path)
            try:
                size = sftp.stat(path).st_size or 0
            except FileNotFoundError:
                return None
            if offset >= size:
                return size, b""
            with sftp.open(path, "rb") as f:
                f.seek(offset)
                return size, f.read(min(limit, size - offset))
    except (OSError, paramiko.SSHException) as e:
        raise FileTransferError(f"node {target.label}: reading {remote_path} failed: {e}") \
            from e
