"""Soak: minutes of tasks, actor calls and puts on a two-node cluster on this machine;
the RSS of every strato process and /dev/shm use sampled each second must stay flat.

    python bench/soak.py [--duration 600] [--warmup 120] [--out soak.jsonl]

A head and one more node (joined with the head's bundle, so TLS and peer links are in the
loop) start in their own temp dirs; the driver loops: 200 small tasks, 50 actor calls
(an actor per node), 20 puts of 1 MB read back and dropped, 4 task results of 4 MB
produced on either node and fetched, a named actor created and killed, then again.
Prints per-second samples to --out and a summary: growth of total RSS, of each process
kind (head, node, workers, driver) and of /dev/shm between the first minute after
warm-up and the last minute. Exit status 0 when all grew < 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 1024 * 1024


def shm_bytes(dirs: list[str]) -> int:
    total = 0
    for d in dirs:
        for root, _dirs, files in os.walk(d):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
    return total


def sample(node_pids: dict[str, int], shm_dirs: list[str]) -> dict:
    out = {"t": time.time(), "driver": psutil.Process().memory_info().rss,
           "shm": shm_bytes(shm_dirs)}
    for name, pid in node_pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = proc.memory_info().rss
            workers = 0
            for child in proc.children(recursive=True):
                try:
                    workers += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            out[f"{name}_workers"] = workers
        except psutil.NoSuchProcess:
            out[name] = 0
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--warmup", type=float, default=120)
    p.add_argument("--out", default="soak.jsonl")
    args = p.parse_args()

    import strato
    from strato.runtime.control import start_node, stop_nodes

    root = tempfile.mkdtemp(prefix="strato-soak-")
    dirs = {"head": os.path.join(root, "head"), "node": os.path.join(root, "node")}
    samples: list[dict] = []
    stop = threading.Event()
    counts = {"tasks": 0, "actor_calls": 0, "puts": 0, "results_mb": 0, "rounds": 0}
    try:
        head = start_node(head=True, port=0, node_ip="127.0.0.1", temp_dir=dirs["head"],
                          num_cpus=2, object_store_memory=200 * MB)
        node = start_node(head=False, address=head.address, join_bundle=head.join_bundle,
                          temp_dir=dirs["node"], num_cpus=2, node_ip="127.0.0.1",
                          resources='{"other": 4}', object_store_memory=200 * MB)
        pids = {"head": head.info["pid"], "node": node.info["pid"]}
        shm_dirs = [head.info["shm_dir"], node.info["shm_dir"]]
        strato.init(address="auto", temp_dir=dirs["head"])

        def sampler():
            with open(args.out, "w") as f:
                while not stop.is_set():
                    s = sample(pids, shm_dirs)
                    samples.append(s)
                    f.write(json.dumps(s) + "\n")
                    f.flush()
                    stop.wait(1.0)
        threading.Thread(target=sampler, daemon=True).start()

        @strato.remote
        def small(i):
            return i * 2

        @strato.remote
        def big(i):
            return np.full(4 * MB // 8, i, dtype=np.int64)

        @strato.remote
        class Counter:
            def __init__(self):
                self.n = 0

            def inc(self, k):
                self.n += k
                return self.n

        here = Counter.remote()
        there = Counter.options(resources={"other": 1}).remote()
        payload = np.ones(MB, dtype=np.uint8)
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            assert strato.get([small.remote(i) for i in range(200)]) == \
                [2 * i for i in range(200)]
            counts["tasks"] += 200
            refs = [a.inc.remote(1) for _ in range(25) for a in (here, there)]
            strato.get(refs)
            counts["actor_calls"] += 50
            for _ in range(20):
                assert strato.get(strato.put(payload))[0] == 1
            counts["puts"] += 20
            outs = strato.get([big.remote(i) for i in range(2)]
                              + [big.options(resources={"other": 1}).remote(i) for i in range(2)])
            assert [int(o[0]) for o in outs] == [0, 1, 0, 1]
            del outs
            counts["results_mb"] += 16
            named = Counter.options(name="soak-named", resources={"other": 0.5}).remote()
            strato.get(named.inc.remote(1))
            strato.kill(named)
            del named
            counts["rounds"] += 1
        stop.set()
    finally:
        stop.set()
        try:
            strato.shutdown()
        except Exception:
            pass
        for d in dirs.values():
            stop_nodes(d)
        shutil.rmtree(root, ignore_errors=True)

    t0 = samples[0]["t"]
    keys = [k for k in samples[0] if k != "t"]
    after = [s for s in samples if s["t"] - t0 >= args.warmup]
    first = [s for s in after if s["t"] - after[0]["t"] < 60]
    last = [s for s in after if after[-1]["t"] - s["t"] < 60]
    print(f"soak: {args.duration:.0f}s, {counts}, {len(samples)} samples")

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))

    ok = True
    for key in keys + ["rss_total"]:
        if key == "rss_total":
            a = sum(mean(first, k) for k in keys if k != "shm")
            b = sum(mean(last, k) for k in keys if k != "shm")
        else:
            a, b = mean(first, key), mean(last, key)
        growth = (b - a) / a * 100 if a > 1 * MB else 0.0
        flag = "ok" if growth < 10 else "GREW"
        ok = ok and (growth < 10 or key == "shm" and b < 64 * MB)
        print(f"  {key:14s} {a / MB:8.1f} MB -> {b / MB:8.1f} MB  {growth:+6.1f}%  {flag}")
    print("flat" if ok else "NOT FLAT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
