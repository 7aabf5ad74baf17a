"""Where a node keeps client working dirs: ``<temp_dir>/working_dirs/<content hash>``."""

from __future__ import annotations

import io
import os
import shutil
import zipfile


def working_dir_root(temp_dir: str) -> str:
    return os.path.join(temp_dir, "working_dirs")


def unpack_working_dir(root: str, pkg: str, zipped: bytes) -> str:
    """Unpack a working dir package into ``root/pkg`` once (atomic rename); its path."""
    final = os.path.join(root, pkg)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        for info in zf.infolist():
            zf.extract(info, tmp)
            mode = info.external_attr >> 16
            if mode:
                os.chmod(os.path.join(tmp, info.filename), mode & 0o777)
    try:
        os.rename(tmp, final)
    except OSError:   # another worker was faster
        shutil.rmtree(tmp, ignore_errors=True)
    return final
