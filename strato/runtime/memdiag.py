"""Where a node process's memory goes, for hunting slow growth (``bench/soak.py``).

With ``STRATO_TRACEMALLOC=<frames>`` in its environment a node traces its Python
allocations; each SIGUSR2 then writes the allocations grown since the first SIGUSR2 (the
baseline, taken after warm-up) to ``tracemalloc-<pid>.txt`` in the node's temp dir. Off
(and free) unless asked for."""

from __future__ import annotations

import os
import signal
import tracemalloc

_state: dict = {"baseline": None}


def install(loop, temp_dir: str) -> None:
    frames = os.environ.get("STRATO_TRACEMALLOC")
    if not frames:
        return
    tracemalloc.start(int(frames))
    loop.add_signal_handler(signal.SIGUSR2, _dump, temp_dir)


def _dump(temp_dir: str) -> None:
    snap = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),))
    path = os.path.join(temp_dir, f"tracemalloc-{os.getpid()}.txt")
    with open(path, "a") as f:
        if _state["baseline"] is None:
            _state["baseline"] = snap
            total = sum(s.size for s in snap.statistics("filename"))
            f.write(f"baseline: {total / 1e6:.1f} MB traced\n")
            return
        stats = snap.compare_to(_state["baseline"], "traceback")
        grown = sum(s.size_diff for s in stats)
        f.write(f"\n=== grown since baseline: {grown / 1e6:+.2f} MB\n")
        for stat in stats[:25]:
            f.write(f"{stat.size_diff / 1e3:+10.1f} kB {stat.count_diff:+7d} blocks\n")
            for line in stat.traceback.format()[-6:]:
                f.write(f"      {line}\n")
