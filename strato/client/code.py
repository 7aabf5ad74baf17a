"""Code travels by value: functions and classes from ``__main__`` (cloudpickle does that
itself) and from local modules, meaning modules whose files are neither in the standard
library nor in site-packages nor part of an installed distribution (an editable install
counts as installed). Registered with ``cloudpickle.register_pickle_by_value`` the
first time a remote function or class is pickled in client mode, so the cluster needs
none of the laptop's files.
"""

from __future__ import annotations

import importlib.metadata
import os
import site
import sys
import sysconfig

import cloudpickle

_decided: dict[str, bool] = {}     # top-level module name -> travels by value
_modules_seen = 0
_installed: set[str] | None = None
_system_dirs: tuple[str, ...] | None = None


def register_local_modules(_target: object = None) -> list[str]:
    """Register every local top-level module imported so far; returns the new ones.

    Cheap when no module was imported since the last call (an ``api.export_hooks`` hook).
    """
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return []
    _modules_seen = len(sys.modules)
    added = []
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if top in _decided:
            continue
        module = sys.modules.get(top)
        local = module is not None and is_local(top, module)
        _decided[top] = local
        if local:
            cloudpickle.register_pickle_by_value(module)
            added.append(top)
    return added


def forget() -> None:
    """Undo the registrations (the client disconnected; this process may go on as a
    driver of a cluster that has these modules itself)."""
    global _modules_seen
    for name, local in _decided.items():
        module = sys.modules.get(name)
        if local and module is not None:
            try:
                cloudpickle.unregister_pickle_by_value(module)
            except ValueError:
                pass
    _decided.clear()
    _modules_seen = 0


def is_local(name: str, module: object) -> bool:
    """Whether ``module`` (top level) is the user's own code rather than installed."""
    if name in ("__main__", "strato") or name in sys.builtin_module_names:
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    if path.startswith(_system()):
        return False
    return name not in _installed_names()


def _system() -> tuple[str, ...]:
    global _system_dirs
    if _system_dirs is None:
        dirs = set()
        paths = sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                dirs.add(paths[key])
        dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        dirs.add(site.getusersitepackages())
        for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
            dirs.add(os.path.join(prefix, "lib"))
        _system_dirs = tuple(os.path.realpath(d) + os.sep for d in dirs if d)
    return _system_dirs


def _installed_names() -> set[str]:
    global _installed
    if _installed is None:
        _installed = set(importlib.metadata.packages_distributions())
    return _installed
