"""Chaos: a mixed workload on three nodes on this machine while a random non-head node is
killed (SIGKILL, with its workers) every few seconds and a replacement joins.

    python bench/chaos.py [--duration 90] [--kill-every 8] [--seed 1]

Each round: 40 tasks with retries, 20 calls to each of two restartable actors, and four
32 MB arrays made by tasks on any node, summed by a task on any node and fetched by the
driver (objects move between nodes; lost ones are rebuilt by lineage). Prints per kill
the time until the work in flight at the kill had all its results, and at the end:
results lost (a get that raised), wrong results, bytes moved, kills. Exit 0 when no
result was lost or wrong.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 1024 * 1024
N_BIG = 32 * MB // 8


def kill_tree(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=90)
    ap.add_argument("--kill-every", type=float, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    os.environ["STRATO_HEARTBEAT_TIMEOUT"] = "2"
    import strato
    from strato.runtime.control import start_node, stop_nodes

    root = tempfile.mkdtemp(prefix="strato-chaos-")
    dirs: list[str] = []
    pids: list[int] = []
    workers: dict[str, dict] = {}        # temp dir -> node info, the live non-head nodes
    lock = threading.Lock()
    kills: list[float] = []
    stop = threading.Event()

    def new_dir() -> str:
        d = os.path.join(root, f"n{len(dirs)}")
        dirs.append(d)
        return d

    def join(head) -> None:
        d = new_dir()
        node = start_node(head=False, address=head.address, join_bundle=head.join_bundle,
                          temp_dir=d, num_cpus=2, node_ip="127.0.0.1",
                          object_store_memory=400 * MB)
        with lock:
            workers[d] = node.info
            pids.append(node.info["pid"])

    stats = {"rounds": 0, "lost": 0, "wrong": 0, "moved_bytes": 0, "results": 0}
    rounds: list[tuple[float, float]] = []
    errors: list[str] = []
    try:
        head = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=new_dir(),
                          num_cpus=1, object_store_memory=600 * MB)
        pids.append(head.info["pid"])
        join(head)
        join(head)
        strato.init(address="auto", temp_dir=dirs[0])

        @strato.remote(max_retries=10)
        def square(i):
            time.sleep(0.02)
            return i * i

        @strato.remote(max_retries=10)
        def make(i):
            return np.full(N_BIG, i, dtype=np.int64)

        @strato.remote(max_retries=10)
        def total(a):
            return int(a.sum())

        @strato.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
        class Tripler:
            def triple(self, x):
                return 3 * x

        actors = [Tripler.remote() for _ in range(2)]

        def killer() -> None:
            while not stop.wait(args.kill_every):
                with lock:
                    live = [d for d, info in workers.items() if psutil.pid_exists(info["pid"])]
                    if not live:
                        continue
                    victim = rng.choice(live)
                    info = workers.pop(victim)
                kills.append(time.time())
                kill_tree(info["pid"])
                print(f"{time.strftime('%H:%M:%S')} killed node {info['node_id'][:8]}",
                      flush=True)
                try:
                    join(head)
                except Exception as exc:   # a failed join is reported, the run goes on
                    errors.append(f"replacement failed to join: {exc}")
        threading.Thread(target=killer, daemon=True).start()

        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            start = time.time()
            checks = []
            checks += [(square.remote(i), i * i) for i in range(40)]
            checks += [(a.triple.remote(i), 3 * i) for a in actors for i in range(20)]
            bigs = [make.remote(i) for i in range(4)]
            checks += [(total.remote(b), i * N_BIG) for i, b in enumerate(bigs)]
            checks += [(b, ("array", i)) for i, b in enumerate(bigs)]
            for ref, want in checks:
                try:
                    got = strato.get(ref, timeout=120)
                except Exception as exc:
                    stats["lost"] += 1
                    errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                stats["results"] += 1
                if isinstance(want, tuple):
                    ok = got.shape == (N_BIG,) and int(got[0]) == want[1] \
                        and int(got[-1]) == want[1]
                    stats["moved_bytes"] += got.nbytes
                else:
                    ok = got == want
                if not ok:
                    stats["wrong"] += 1
            del checks, bigs, got
            rounds.append((start, time.time()))
            stats["rounds"] += 1
        stop.set()
    finally:
        stop.set()
        try:
            strato.shutdown()
        except Exception:
            pass
        for d in reversed(dirs):
            try:
                stop_nodes(d, timeout=5)
            except Exception:
                pass
        for pid in pids:
            kill_tree(pid)
        for pid in pids:
            for path in [p for p in os.listdir("/dev/shm") if p.startswith(f"strato-{pid}-")]:
                shutil.rmtree(os.path.join("/dev/shm", path), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    recover = []
    for k in kills:
        ends = [end for start, end in rounds if start <= k <= end]
        if ends:
            recover.append(ends[0] - k)
    print(f"chaos: {args.duration:.0f}s, {len(kills)} kills, {stats['rounds']} rounds, "
          f"{stats['results']} results, lost {stats['lost']}, wrong {stats['wrong']}, "
          f"{stats['moved_bytes'] / 2**30:.2f} GB fetched across nodes")
    if recover:
        recover.sort()
        print(f"time for the work in flight at a kill to finish: median "
              f"{recover[len(recover) // 2]:.1f}s, max {recover[-1]:.1f}s "
              f"({', '.join(f'{r:.1f}' for r in recover)})")
    for e in errors[:10]:
        print("  error:", e)
    return 0 if stats["lost"] == 0 and stats["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
