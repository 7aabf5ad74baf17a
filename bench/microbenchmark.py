#!/usr/bin/env python3
"""Core-runtime microbenchmark: strato vs Ray, same workloads as `ray microbenchmark`.

The workload shapes (batch sizes, array sizes, actor counts) mirror
``ray/_private/ray_perf.py`` from Ray 2.58; the code is written only against
the public Ray Core API so it runs unchanged with ``import strato as rt`` and
``import ray as rt``.

Modes:
  --backend strato|ray   run the cases in this process, print JSON to stdout
                         (one JSON line per finished case, then a summary line)
  (default)              run the strato backend in a subprocess with
                         sys.executable and, with --ray-python PY, the ray
                         backend with that interpreter; print one table, then
                         the floor (a raw unix-socket ping-pong between two
                         processes, measured here in each round) and each sync
                         case as a fraction of it.

The "between nodes" cases run last, on two nodes started on this machine (separate
temp dirs, loopback; see bench/between_nodes.py), after the single-node cases.

Examples:
  python bench/microbenchmark.py --ray-python /opt/rayvenv/bin/python
  /opt/rayvenv/bin/python bench/microbenchmark.py --backend ray --duration 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import between_nodes  # noqa: E402 - bench/between_nodes.py, next to this file

# name, unit. Order is the order they run in. The unit of every case is
# operations per second except "put gigabytes", which is GB/s with Ray's
# convention (one 100Mi-element int64 array counts as 0.8 GB), and the 100 MB
# object between nodes (GB/s, 100 MiB counts as 0.1 GB).
CASES: list[tuple[str, str]] = [
    ("single client get calls", "ops/s"),
    ("single client put calls", "ops/s"),
    ("single client put gigabytes", "GB/s"),
    ("single client get object containing 10k refs", "ops/s"),
    ("single client wait 1k refs", "ops/s"),
    ("single client wait 1k ready refs", "ops/s"),
    ("single client get 1k ready refs", "ops/s"),
    ("single client tasks sync", "ops/s"),
    ("single client tasks async", "ops/s"),
    ("multi client tasks async", "ops/s"),
    ("1:1 actor calls sync", "ops/s"),
    ("1:1 actor calls async", "ops/s"),
    ("1:1 actor calls concurrent", "ops/s"),
    ("1:n actor calls async", "ops/s"),
    ("n:n actor calls async", "ops/s"),
    ("1:1 async-actor calls async", "ops/s"),
    *between_nodes.CASES,   # two nodes on this machine; they run last
]
CASE_NAMES = [c for c, _ in CASES]
UNITS = dict(CASES)

JSON_TAG = "strato-microbenchmark"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Workloads (in-process, against `rt`, which is either strato or ray)
# --------------------------------------------------------------------------


def _define(rt: Any) -> dict[str, Any]:
    """Define the remote functions/classes of ray_perf.py against ``rt``."""

    @rt.remote
    def small_value():
        return b"ok"

    @rt.remote
    def create_object_containing_ref():
        return [rt.put(1) for _ in range(10000)]

    @rt.remote(num_cpus=0)
    class Actor:
        def small_value(self):
            return b"ok"

        def small_value_arg(self, x):
            return b"ok"

        def small_value_batch(self, n):
            rt.get([small_value.remote() for _ in range(n)])

    @rt.remote
    class AsyncActor:
        async def small_value(self):
            return b"ok"

        async def small_value_with_arg(self, x):
            return b"ok"

        async def small_value_batch(self, n):
            await asyncio.wait([small_value.remote() for _ in range(n)])

    @rt.remote(num_cpus=0)
    class Client:
        def __init__(self, servers):
            if not isinstance(servers, list):
                servers = [servers]
            self.servers = servers

        def small_value_batch(self, n):
            results = []
            for s in self.servers:
                results.extend([s.small_value.remote() for _ in range(n)])
            rt.get(results)

    @rt.remote
    def actor_work(actors, n):
        k = len(actors)
        rt.get([actors[i % k].small_value.remote() for i in range(n)])

    return {
        "small_value": small_value,
        "create_object_containing_ref": create_object_containing_ref,
        "Actor": Actor,
        "AsyncActor": AsyncActor,
        "Client": Client,
        "actor_work": actor_work,
    }


def _setup_case(rt: Any, d: dict[str, Any], name: str) -> tuple[Callable[[], Any], float, list]:
    """Return (fn, multiplier, keepalive) for one case; one fn() call is
    ``multiplier`` operations (or GB for put gigabytes)."""
    import numpy as np

    small_value = d["small_value"]
    Actor, AsyncActor, Client = d["Actor"], d["AsyncActor"], d["Client"]
    n_half = max(1, (os.cpu_count() or 2) // 2)

    if name == "single client get calls":
        value = rt.put(0)
        return (lambda: rt.get(value)), 1, [value]

    if name == "single client put calls":
        return (lambda: rt.put(0)), 1, []

    if name == "single client put gigabytes":
        arr = np.zeros(100 * 1024 * 1024, dtype=np.int64)
        return (lambda: rt.put(arr)), 8 * 0.1, [arr]

    if name == "single client get object containing 10k refs":
        ref = d["create_object_containing_ref"].remote()
        rt.get(ref)
        return (lambda: rt.get(ref)), 1, [ref]

    if name == "single client wait 1k refs":
        has_fetch_local = _accepts_kwarg(rt.wait, "fetch_local")

        def wait_multiple_refs():
            not_ready = [small_value.remote() for _ in range(1000)]
            fetch_local = True
            for _ in range(1000):
                if has_fetch_local:
                    _ready, not_ready = rt.wait(not_ready, fetch_local=fetch_local)
                    fetch_local = False
                else:
                    _ready, not_ready = rt.wait(not_ready)

        return wait_multiple_refs, 1, []

    if name in ("single client wait 1k ready refs", "single client get 1k ready refs"):
        # not in ray_perf.py: wait() on refs that are all ready must cost no more than
        # get() of the same refs (one op = one call on all 1,000)
        refs = [small_value.remote() for _ in range(1000)]
        rt.get(refs)
        if name.startswith("single client wait"):
            return (lambda: rt.wait(refs, num_returns=len(refs))), 1, [refs]
        return (lambda: rt.get(refs)), 1, [refs]

    if name == "single client tasks sync":
        return (lambda: rt.get(small_value.remote())), 1, []

    if name == "single client tasks async":
        return (lambda: rt.get([small_value.remote() for _ in range(1000)])), 1000, []

    if name == "multi client tasks async":
        n, m = 10000, 4
        actors = [Actor.remote() for _ in range(m)]
        return (lambda: rt.get([a.small_value_batch.remote(n) for a in actors])), n * m, actors

    if name == "1:1 actor calls sync":
        a = Actor.remote()
        return (lambda: rt.get(a.small_value.remote())), 1, [a]

    if name == "1:1 actor calls async":
        a = Actor.remote()
        return (lambda: rt.get([a.small_value.remote() for _ in range(1000)])), 1000, [a]

    if name == "1:1 actor calls concurrent":
        a = Actor.options(max_concurrency=16).remote()
        return (lambda: rt.get([a.small_value.remote() for _ in range(1000)])), 1000, [a]

    if name == "1:n actor calls async":
        n = 5000
        actors = [Actor.remote() for _ in range(n_half)]
        client = Client.remote(actors)
        return (
            (lambda: rt.get(client.small_value_batch.remote(n))),
            n * len(actors),
            [client, actors],
        )

    if name == "n:n actor calls async":
        n, m = 5000, 4
        actors = [Actor.remote() for _ in range(n_half)]
        work = d["actor_work"]
        return (lambda: rt.get([work.remote(actors, n) for _ in range(m)])), n * m, actors

    if name == "1:1 async-actor calls async":
        a = AsyncActor.remote()
        return (lambda: rt.get([a.small_value.remote() for _ in range(1000)])), 1000, [a]

    raise ValueError(f"unknown case {name!r}")


def _raise(exc: BaseException):
    raise exc


def _accepts_kwarg(fn: Callable, kw: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return kw in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    """Raise _CaseTimeout in the main thread after ``seconds`` (0: no limit)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise _CaseTimeout(f"case exceeded {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tree_cpu() -> dict[int, float] | None:
    """CPU seconds (user + system) used so far by this process and each descendant (the
    backend's node, head and worker processes), by pid; None without psutil. Unlike
    throughput, CPU per operation hardly moves when other load shares the machine."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _cpu_spent(before: dict | None, after: dict | None) -> float | None:
    """CPU the process tree spent between two ``_tree_cpu`` samples; None when a process
    exited meanwhile (its time is gone with it) or either sample is missing."""
    if before is None or after is None or any(pid not in after for pid in before):
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _timeit(fn: Callable[[], Any], multiplier: float, duration: float, warmup: float,
            self_timed: bool = False) -> dict:
    """Calls/s of ``fn`` times ``multiplier``. With ``self_timed`` each call returns the
    seconds of the part it measured itself, and the rate is over their sum (the windows
    below still count wall time)."""
    # Warm-up: at least one call, then keep going until `warmup` seconds.
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup:
        fn()
    # Timed window: at least one call, then until `duration` seconds.
    count = 0
    timed = 0.0
    cpu0 = _tree_cpu()
    start = time.perf_counter()
    while True:
        dt = fn()
        count += 1
        elapsed = time.perf_counter() - start
        if self_timed:
            timed += dt
        if elapsed >= duration:
            break
    cpu1 = _tree_cpu()
    rec = {"value": multiplier * count / (timed if self_timed else elapsed), "calls": count,
           "seconds": elapsed}
    spent = None if self_timed else _cpu_spent(cpu0, cpu1)   # self-timed: nodes not ours
    if spent is not None:
        rec["cpu_per_op"] = spent / (multiplier * count)
    if self_timed:
        rec["timed_seconds"] = timed
    return rec


def _init_kwargs(backend: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_cpus": os.cpu_count()}
    if backend == "ray":
        kw.update(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    return kw


def run_backend(
    backend: str,
    cases: list[str],
    duration: float,
    warmup: float,
    case_timeout: int,
) -> int:
    """Run ``cases`` in-process; one JSON line per case, then a summary line."""
    out: dict[str, Any] = {
        "tag": JSON_TAG,
        "kind": "summary",
        "backend": backend,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "duration": duration,
        "results": {},
    }

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    # SIGTERM (the top level's --backend-timeout) unwinds, so the two nodes get stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    local = [c for c in cases if c not in between_nodes.CASE_NAMES]
    remote = [c for c in cases if c in between_nodes.CASE_NAMES]
    try:
        if backend == "ray":
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            import ray as rt
        else:
            import strato as rt
        out["version"] = getattr(rt, "__version__", None)
        if local:
            rt.init(**_init_kwargs(backend))
            d = _define(rt)
    except BaseException as e:  # noqa: BLE001 - report anything, incl. missing API
        out["error"] = f"{type(e).__name__}: {e}"
        emit(out)
        return 2

    failed = 0

    def run_case(name: str, setup: Callable[[], tuple], self_timed: bool = False) -> None:
        nonlocal failed
        rec: dict[str, Any] = {"tag": JSON_TAG, "kind": "case", "backend": backend, "case": name}
        rec["unit"] = UNITS[name]
        _log(f"[{backend}] {name} ...")
        keep: list = []
        try:
            with _alarm(case_timeout):
                fn, mult, keep = setup()
                rec.update(_timeit(fn, mult, duration, warmup, self_timed))
            _log(f"[{backend}] {name}: {rec['value']:.2f} {rec['unit']}")
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            failed += 1
            rec["error"] = f"{type(e).__name__}: {e}"
            _log(f"[{backend}] {name}: FAILED {rec['error']}")
        del keep
        out["results"][name] = rec
        emit(rec)

    for name in local:
        run_case(name, lambda name=name: _setup_case(rt, d, name))
    if local:
        with contextlib.suppress(Exception):
            rt.shutdown()

    if remote:
        cluster = between_nodes.TwoNodes(backend, rt)
        try:
            try:
                with _alarm(case_timeout):
                    cluster.start()
            except Exception as e:  # noqa: BLE001 - the cases below report it
                err = f"two nodes did not start: {type(e).__name__}: {e}"
                _log(f"[{backend}] {err}")
                for name in remote:
                    run_case(name, lambda err=err: _raise(RuntimeError(err)))
            else:
                for name in remote:
                    run_case(name, lambda name=name: between_nodes.setup_case(rt, name),
                             self_timed=True)
        finally:
            cluster.stop()   # by pid, outside any alarm
    emit(out)
    return 1 if failed else 0


# --------------------------------------------------------------------------
# The floor: a raw unix-socket ping-pong between two processes on this machine
# --------------------------------------------------------------------------

FLOOR_NAME = "raw unix-socket ping-pong (2 processes)"
PING_BYTES = 100


def _recv_exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def measure_unix_pingpong(duration: float, warmup: float) -> dict:
    """Round trips/s of a 100-byte message between this process and a forked echo
    process over a unix socketpair: what any sync call (one request, one reply between
    two processes) can at best reach here, with no runtime at all."""
    import socket

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the echo process
        parent.close()
        try:
            while True:
                child.sendall(_recv_exact(child, PING_BYTES))
        except BaseException:  # noqa: BLE001 - the parent closed: done
            pass
        os._exit(0)
    child.close()
    msg = b"x" * PING_BYTES

    def one() -> None:
        parent.sendall(msg)
        _recv_exact(parent, PING_BYTES)

    try:
        return _timeit(one, 1, duration, warmup)
    finally:
        parent.close()
        os.waitpid(pid, 0)


def _sync_cases(cases: list[str]) -> list[str]:
    return [c for c in cases if c.endswith(" sync")]


def print_floor(cases: list[str], runs: dict[str, dict], floor: dict) -> None:
    """The floor, and each sync case (one call = one round trip at least) as a fraction."""
    print(f"{FLOOR_NAME}, {PING_BYTES}-byte messages: {floor['value']:,.0f} round trips/s "
          "(the floor under any sync call)")
    sync = _sync_cases(cases)
    if not sync:
        return
    width = max(len(c) for c in sync)
    print(f"{'sync case as a fraction of the floor':<{width}}  " +
          "  ".join(f"{b:>8}" for b in runs))
    for name in sync:
        cells = []
        for b in runs:
            rec = runs[b]["results"].get(name)
            cells.append(f"{rec['value'] / floor['value']:>8.1%}" if rec and "value" in rec
                         else f"{'-':>8}")
        print(f"{name:<{width}}  " + "  ".join(cells))


# --------------------------------------------------------------------------
# Top-level mode: run each backend in a subprocess, print one table
# --------------------------------------------------------------------------


def _spawn(backend: str, python: str, cases: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--backend", backend]
    cmd += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    cmd += ["--case-timeout", str(args.case_timeout), "--exact-cases", json.dumps(cases)]
    _log(f"== {backend}: {' '.join(cmd[:4])} ...")
    res: dict[str, Any] = {"backend": backend, "python": python, "results": {}}
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.PIPE,
            text=True,
        )
    except OSError as e:
        res["error"] = f"could not start {python}: {e}"
        return res
    try:
        stdout, stderr = proc.communicate(timeout=args.backend_timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        # SIGTERM first: the backend then stops the nodes it started (between-nodes cases)
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        rc = None
        res["error"] = f"timed out after {args.backend_timeout}s"
    stdout, stderr = stdout or "", stderr or ""

    summary = None
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("tag") != JSON_TAG:
            continue
        if obj.get("kind") == "case":
            res["results"][obj["case"]] = obj
        elif obj.get("kind") == "summary":
            summary = obj
    if summary is not None:
        for k in ("version", "cpu_count", "platform"):
            res[k] = summary.get(k)
        if "error" in summary:
            res["error"] = summary["error"]
    elif "error" not in res:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        res["error"] = f"exit code {rc}, no summary" + (f": {tail}" if tail else "")
    res["returncode"] = rc
    if res.get("error"):
        _log(f"== {backend}: FAILED: {res['error']}")
    return res


def _merge_rounds(rs: list[dict], cases: list[str]) -> dict[str, Any]:
    """Combine the rounds of one backend: per-case median of the good runs."""
    if len(rs) == 1:
        return rs[0]
    merged = {k: v for k, v in rs[-1].items() if k != "results"}
    merged["rounds"] = rs
    errs = [r["error"] for r in rs if r.get("error")]
    if errs:
        merged["error"] = f"{len(errs)}/{len(rs)} rounds failed; last: {errs[-1]}"
    merged["results"] = {}
    for name in cases:
        recs = [r["results"][name] for r in rs if name in r["results"]]
        good = sorted((x for x in recs if "value" in x), key=lambda x: x["value"])
        if good:
            rec = dict(good[len(good) // 2])
            rec["value"] = statistics.median(x["value"] for x in good)
            cpu = [x["cpu_per_op"] for x in good if "cpu_per_op" in x]
            if cpu:
                rec["cpu_per_op"] = statistics.median(cpu)
            rec["values"] = [x["value"] for x in good]
            merged["results"][name] = rec
        elif recs:
            merged["results"][name] = recs[-1]
    return merged


def _short_error(err: str, limit: int = 300) -> str:
    """First and last line of a (possibly multi-line, colored) error, ANSI removed."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", err).splitlines() if ln.strip()]
    if not lines:
        return err
    msg = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _fmt(rec: dict | None, backend_error: str | None) -> str:
    if rec is None:
        return "FAILED" if backend_error else "-"
    if "error" in rec:
        return "ERROR"
    v = rec["value"]
    s = f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    return s + (" GB/s" if rec.get("unit") == "GB/s" else "")


def print_table(cases: list[str], runs: dict[str, dict]) -> None:
    backends = list(runs)
    header = ["case", *backends] + (["strato/ray", "CPU/op ray/strato"]
                                    if len(backends) == 2 else [])
    rows = []
    for name in cases:
        row = [name]
        vals = []
        cpus = []
        for b in backends:
            rec = runs[b]["results"].get(name)
            row.append(_fmt(rec, runs[b].get("error")))
            vals.append(rec["value"] if rec and "value" in rec else None)
            cpus.append(rec.get("cpu_per_op") if rec else None)
        if len(backends) == 2:
            row.append(f"{vals[0] / vals[1]:.2f}x" if None not in vals and vals[1] else "-")
            # how many times less CPU strato spends per operation (all processes)
            row.append(f"{cpus[1] / cpus[0]:.2f}x" if None not in cpus and cpus[0] else "-")
        rows.append(row)

    notes = []
    for b in backends:
        r = runs[b]
        ver = f" {r['version']}" if r.get("version") else ""
        if r.get("error"):
            notes.append(f"{b}{ver}: FAILED - {r['error']}")
        for name in cases:
            rec = r["results"].get(name)
            if rec and "error" in rec:
                notes.append(f"{b} / {name}: {_short_error(rec['error'])}")

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
        print(fmt.format(*header))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print(fmt.format(*row))
        for n in notes:
            print(n)
        return

    table = Table(
        title="strato vs ray microbenchmark", caption="ops/s unless noted; higher is better"
    )
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in rows:
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    for n in notes:
        console.print(n, style="red", markup=False, highlight=False)


def select_cases(filters: str | None) -> list[str]:
    if not filters:
        return list(CASE_NAMES)
    pats = [p.strip() for p in filters.split(",") if p.strip()]
    return [c for c in CASE_NAMES if any(p in c for p in pats)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["strato", "ray"], help="run in-process, print JSON")
    p.add_argument("--ray-python", help="python with ray installed, e.g. /opt/rayvenv/bin/python")
    p.add_argument("--no-strato", action="store_true", help="top-level mode: skip strato")
    p.add_argument("--cases", help="comma-separated substring filter on case names")
    p.add_argument("--exact-cases", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=2.0, help="timed seconds per case")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default: 1)")
    p.add_argument("--case-timeout", type=int, default=180, help="seconds per case, 0 = none")
    p.add_argument("--backend-timeout", type=float, default=1800, help="seconds per backend")
    p.add_argument("--rounds", type=int, default=1, help="top-level: alternating runs, median")
    p.add_argument("--json", dest="json_out", help="top-level mode: save results here")
    p.add_argument("--list", action="store_true", help="list case names and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="show backend stderr live")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(1.0, args.duration)

    if args.list:
        print("\n".join(CASE_NAMES))
        return 0

    if args.exact_cases:
        cases = [c for c in json.loads(args.exact_cases) if c in UNITS]
    else:
        cases = select_cases(args.cases)
    if not cases:
        p.error(f"no case matches {args.cases!r}; see --list")

    if args.backend:
        return run_backend(args.backend, cases, args.duration, args.warmup, args.case_timeout)

    plan: list[tuple[str, str]] = []
    if not args.no_strato:
        plan.append(("strato", sys.executable))
    if args.ray_python:
        plan.append(("ray", args.ray_python))
    if not plan:
        p.error("nothing to run: drop --no-strato or give --ray-python")

    # Rounds alternate the backends (strato, ray, ray, strato, ...) so slow
    # drift on the machine hits both alike; the table shows the per-case median.
    rounds: dict[str, list[dict]] = {b: [] for b, _ in plan}
    floors: list[dict] = []   # the raw ping-pong, once per round, between the backends
    for i in range(max(1, args.rounds)):
        if args.rounds > 1:
            _log(f"== round {i + 1}/{args.rounds}")
        for b, py in plan if i % 2 == 0 else plan[::-1]:
            rounds[b].append(_spawn(b, py, cases, args))
        floors.append(measure_unix_pingpong(args.duration, args.warmup))
    runs = {b: _merge_rounds(rs, cases) for b, rs in rounds.items()}
    floor = dict(floors[0])
    floor["value"] = statistics.median(f["value"] for f in floors)

    print_table(cases, runs)
    print_floor(cases, runs, floor)
    if args.json_out:
        doc = {"duration": args.duration, "cpu_count": os.cpu_count(), "cases": cases,
               "floor": {"name": FLOOR_NAME, **floor}}
        doc["backends"] = runs
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
        _log(f"saved {args.json_out}")
    ok = all(not r.get("error") and len(r["results"]) == len(cases) for r in runs.values())
    ok = ok and all("error" not in rec for r in runs.values() for rec in r["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
