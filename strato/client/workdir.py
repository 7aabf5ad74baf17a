"""``init(cluster=..., working_dir=".")``: sync a directory to the head, once per content.

Each file is named by its sha256; only contents the head lacks are sent. ``.git``,
``__pycache__``, virtualenvs (any directory holding ``pyvenv.cfg``) and what the tree's
``.gitignore`` files name are left out (git's rules, nested files and negations too: the
matcher of ``rsync_filter``); above ``WARN_BYTES`` a warning says how much is synced. The head assembles the package (content hash of the whole manifest)
once; every task of this driver then runs with it on ``sys.path`` and as its cwd.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from strato.runtime.core import CoreWorker
from strato.ssh.files import CopyFilter

WARN_BYTES = 100 * 1024 * 1024
PIECE = 4 * 1024 * 1024
ALWAYS_EXCLUDED = {".git", "__pycache__", ".hg", ".svn", ".mypy_cache", ".pytest_cache",
                   ".ruff_cache", ".tox"}


def manifest(root: str) -> dict[str, tuple[str, int, int]]:
    """``{relative path: (sha256, mode, size)}`` of the files that travel."""
    root = os.path.abspath(root)
    ignore = CopyFilter(filter_files=(".gitignore",)).walk_local(root)
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if d in ALWAYS_EXCLUDED or os.path.exists(os.path.join(full, "pyvenv.cfg")) \
                    or os.path.islink(full) or ignore.excluded(rel_dir + d, True):
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for name in sorted(filenames):
            rel = rel_dir + name
            path = os.path.join(dirpath, name)
            if ignore.excluded(rel, False) or not os.path.isfile(path):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
            st = os.stat(path)
            out[rel] = (h.hexdigest(), st.st_mode & 0o777, st.st_size)
    return out


def package_hash(files: dict[str, tuple[str, int, int]]) -> str:
    text = json.dumps(sorted((rel, digest, mode) for rel, (digest, mode, _) in files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def sync(core: CoreWorker, root: str) -> tuple:
    """Send what the head lacks and have it assemble the package; returns what a task's
    ``runtime_env["working_dir"]`` names."""
    if not os.path.isdir(root):
        raise ValueError(f"init(working_dir={root!r}): not a directory")
    files = manifest(root)
    total = sum(size for _, _, size in files.values())
    if total > WARN_BYTES:
        print(f"strato warning: working_dir {root} is {total / 1e6:.0f} MB in {len(files)} "
              "files; everything it holds goes to the cluster (list what should not in its "
              ".gitignore)", file=sys.stderr, flush=True)
    by_digest = {digest: rel for rel, (digest, _, _) in files.items()}
    for digest in core.rpc("wd_missing", sorted(by_digest)):
        path = os.path.join(root, by_digest[digest])
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(PIECE)
                core.rpc("wd_file", digest, offset, data, size)
                offset += len(data)
                if offset >= size:
                    break
    return core.rpc("wd_commit", package_hash(files),
                    {rel: (digest, mode) for rel, (digest, mode, _) in files.items()},
                    timeout=600.0)
