#!/usr/bin/env python3
"""Serverless client benchmark: strato's client vs Ray Client, side by side in one run.

strato: a local-provider cluster (2 CPUs) brought up once, then a client process that
does ``strato.init(cluster=...)``. Ray: ``ray start --head --num-cpus 2
--ray-client-server-port P``, then a client process doing ``ray.init("ray://...")``.
Both clients run the same workloads written against the common API:

  connect           init() to a running cluster, seconds (lower is better)
  tasks sync        get(f.remote()) one at a time, calls/s
  tasks async       1000 f.remote() then get() of all, calls/s
  put 100 MB        put() of a 100 MB numpy array, seconds
  get 100 MB        get() of that object, seconds
  100 MB result     get(f.remote()) of a task returning 100 MB, seconds

strato also reports its cold start: init(cluster=...) with nothing running, to the first
result (the cluster comes up inside it).

  python bench/client.py --ray-python /opt/rayvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB100 = 100 * 1024 * 1024 // 8
CASES = [("connect", "s"), ("tasks sync", "calls/s"), ("tasks async", "calls/s"),
         ("put 100 MB", "s"), ("get 100 MB", "s"), ("100 MB result", "s")]
LOWER_IS_BETTER = {name for name, unit in CASES if unit == "s"}


# ---------------------------------------------------------------- one backend, in-process
def run_backend(backend: str, target: str, duration: float) -> dict:
    import numpy as np
    if backend == "strato":
        import strato as rt
        start = time.perf_counter()
        rt.init(cluster=target)
    else:
        import ray as rt
        start = time.perf_counter()
        rt.init(target, logging_level="ERROR")
    out = {"connect": time.perf_counter() - start}

    @rt.remote
    def small(x=None):
        return b"ok"

    @rt.remote
    def zeros(n):
        return np.zeros(n, dtype=np.int64)

    rt.get(small.remote())   # warm: a worker is up, the function exported
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        rt.get(small.remote())
        n += 1
    out["tasks sync"] = n / (time.perf_counter() - t0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        rt.get([small.remote() for _ in range(1000)])
        n += 1000
    out["tasks async"] = n / (time.perf_counter() - t0)
    arr = np.arange(MB100, dtype=np.int64)
    puts, gets, results = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        ref = rt.put(arr)
        puts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = rt.get(ref)
        gets.append(time.perf_counter() - t0)
        assert got.shape == arr.shape
        del got, ref
        t0 = time.perf_counter()
        res = rt.get(zeros.remote(MB100))
        results.append(time.perf_counter() - t0)
        assert res.shape == (MB100,)
        del res
    out["put 100 MB"] = sorted(puts)[1]
    out["get 100 MB"] = sorted(gets)[1]
    out["100 MB result"] = sorted(results)[1]
    rt.shutdown()
    return out


def cold_start(config: str) -> float:
    import strato
    t0 = time.perf_counter()
    strato.init(cluster=config)
    strato.get(strato.remote(lambda: 1).remote())
    elapsed = time.perf_counter() - t0
    strato.shutdown()
    return elapsed


# ---------------------------------------------------------------- orchestration
def _child(python: str, *args: str, env: dict | None = None, timeout: float = 600) -> dict:
    proc = subprocess.run([python, __file__, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def bench_strato(duration: float) -> tuple[dict, float]:
    home = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    config = home / "cluster.yaml"
    config.write_text("cluster_name: bench-client\nprovider: {type: local}\n"
                      "available_node_types:\n  head: {resources: {CPU: 2}}\n"
                      "head_node_type: head\n")
    env = {**os.environ, "STRATO_HOME": str(home)}
    try:
        cold = _child(sys.executable, "--cold-start", str(config), env=env)["cold start"]
        return _child(sys.executable, "--backend", "strato", "--target", str(config),
                      "--duration", str(duration), env=env), cold
    finally:
        subprocess.run([sys.executable, "-m", "strato.cli", "down", str(config), "-y"],
                       capture_output=True, env=env, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def bench_ray(python: str, duration: float, port: int = 10001) -> dict:
    ray = str(Path(python).with_name("ray"))
    tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    # Ray's own venv: a PYTHONPATH meant for strato's Python has no business there
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--ray-client-server-port",
                    str(port), "--include-dashboard=false", f"--temp-dir={tmp}"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        return _child(python, "--backend", "ray", "--target", f"ray://127.0.0.1:{port}",
                      "--duration", str(duration), env=env)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} s" if name in LOWER_IS_BETTER else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ray-python", help="python with ray installed, e.g. /opt/rayvenv/bin/python")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per task case")
    p.add_argument("--backend", choices=["strato", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--cold-start", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_start:
        print(json.dumps({"cold start": cold_start(args.cold_start)}))
        return 0
    if args.backend:
        print(json.dumps(run_backend(args.backend, args.target, args.duration)))
        return 0
    strato_res, cold = bench_strato(args.duration)
    ray_res = bench_ray(args.ray_python, args.duration) if args.ray_python else {}
    print(f"{'case':<16}{'strato client':>16}{'Ray Client':>16}{'ratio':>10}")
    for name, _unit in CASES:
        s, r = strato_res.get(name), ray_res.get(name)
        ratio = "-"
        if s and r:
            ratio = f"{(r / s if name in LOWER_IS_BETTER else s / r):.1f}x"
        print(f"{name:<16}{_fmt(name, s):>16}{_fmt(name, r):>16}{ratio:>10}")
    print(f"strato cold start (local provider, nothing running -> first result): {cold:.2f} s")
    print("ratio: how many times better strato is (time: Ray/strato; rate: strato/Ray)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
