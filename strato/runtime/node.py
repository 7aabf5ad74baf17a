"""One machine's runtime process: a node agent, plus the head service on the head node.

``python -m strato.runtime.node`` is what ``strato start`` and ``strato.init()`` launch.
It writes a node file under the temp dir (address, pid, socket; token in a 0600 file)
so ``address="auto"``, drivers on this machine and ``strato stop`` find it.
"""

from __future__ import annotations

import os

# workers are forked from this process: gRPC's fork handlers only add noise here
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import json
import logging
import secrets
import signal
import socket
import sys
import time

import psutil

from strato.exceptions import AuthenticationError
from strato.runtime import memdiag, tls
from strato.runtime import messages as m
from strato.runtime import resources as resource_detection
from strato.runtime.agent import NodeAgent
from strato.runtime.agent.objects import PULL_CHUNK_TIMEOUT
from strato.runtime.bulk import BulkClient, BulkServer
from strato.runtime.head import HeadService
from strato.runtime.head_store import HeadStore
from strato.runtime.session import DEFAULT_TEMP_DIR, ForeignDirError, ensure_private_dir
from strato.runtime.store import remove_dead_store_dirs
from strato.runtime.transport import HeadLink, PeerLinks, RuntimeServer, connect_in_process

DEFAULT_PORT = 6380
log = logging.getLogger("strato.node")


def guess_node_ip(head_address: str | None) -> str:
    """The address other machines reach this one at: the route toward the head."""
    target = head_address.rsplit(":", 1)[0] if head_address else None
    if not target:
        # a head: advertise the first non-loopback IPv4 address this machine has
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127."):
                    return a.address
        return "127.0.0.1"
    if target not in ("127.0.0.1", "localhost"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((target, 9))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
        except OSError:
            pass
        finally:
            s.close()
    return "127.0.0.1"


async def run_node(args) -> int:
    temp_dir = os.path.abspath(args.temp_dir)
    node_id = os.urandom(16)
    short = node_id.hex()[:8]
    session_dir = os.path.join(temp_dir, "session")
    try:
        ensure_private_dir(temp_dir)
    except ForeignDirError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    os.makedirs(os.path.join(temp_dir, "nodes"), exist_ok=True)
    os.makedirs(session_dir, exist_ok=True)
    os.makedirs(os.path.join(temp_dir, "logs"), exist_ok=True)
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else session_dir
    shm_dir = os.path.join(shm_root, f"strato-{os.getpid()}-{short}")
    for stale in remove_dead_store_dirs(shm_root):   # killed nodes never clean up
        log.info("removed the store dir of a dead node: %s", stale)

    # the head's tables on its disk: a head that crashed resumes from them (same token)
    head_store = HeadStore(os.path.join(temp_dir, "head.db")) if args.head else None
    token = args.token or os.environ.get("STRATO_TOKEN") \
        or (head_store and head_store.get("token")) \
        or (secrets.token_hex(16) if args.head else None)
    if head_store is not None:
        head_store.set("token", token)
    os.environ.pop("STRATO_TOKEN", None)  # no child (workers: user code) inherits it
    if not token:
        print("strato: a cluster token is needed to join: pass --token or set STRATO_TOKEN",
              file=sys.stderr)
        return 2
    resources = resource_detection.node_resources(
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, memory=args.memory,
        custom=json.loads(args.resources) if args.resources else None)
    tls_dir = os.path.abspath(args.tls_dir or os.path.join(temp_dir, "tls"))
    creds = tls.load(tls_dir)
    if creds is None and args.head:   # a head started by hand: its cluster's CA is born here
        creds = tls.new_cluster(short)
        tls.save(tls_dir, creds)
    if creds is None:
        print("strato: joining a cluster needs its TLS credentials: pass --join-bundle FILE "
              "(the file `strato start --head` wrote on the head)", file=sys.stderr)
        return 2
    node_ip = args.node_ip or guess_node_ip(args.address)
    bind_host = "0.0.0.0" if node_ip != "127.0.0.1" else "127.0.0.1"
    store_memory = args.object_store_memory or int(psutil.virtual_memory().total * 0.3)
    labels = json.loads(args.labels) if args.labels else {}

    head = HeadService(heartbeat_timeout=float(os.environ.get("STRATO_HEARTBEAT_TIMEOUT", "5")),
                       storage_dir=os.environ.get("STRATO_CHECKPOINT_DIR")
                       or os.path.join(temp_dir, "checkpoints"), store=head_store,
                       resume_grace=float(os.environ.get("STRATO_HEAD_RESUME_GRACE", "10")),
                       view_interval=float(os.environ.get("STRATO_VIEW_INTERVAL_S", "0.2")),
                       ) if args.head else None
    agent = NodeAgent(node_id=node_id, resources=resources, temp_dir=temp_dir,
                      session_dir=session_dir, shm_dir=shm_dir,
                      object_store_memory=store_memory, address="", labels=labels)
    server = RuntimeServer(token, creds, head=head, agent=agent)
    port = await server.start(bind_host, args.port if args.head else 0)
    agent.address = f"{node_ip}:{port}"
    agent.peers = PeerLinks(agent, token, creds)
    # objects between nodes: their own mutual-TLS channel, whole objects (runtime/bulk.py)
    bulk = BulkServer(creds, token, lambda: agent.store.paths)
    agent.bulk_port = bulk.start(bind_host)
    agent.bulk = BulkClient(bulk.client_ctx, token, PULL_CHUNK_TIMEOUT)
    head_link = None
    client_port = None
    if head is not None:
        await head.start()
        await agent.start(prestart_workers=min(2, int(resources.get("CPU", 0))))
        # remote drivers (the serverless client) come in over SSH to 127.0.0.1 only
        client_port = await agent.start_client_endpoint(
            token, int(os.environ.get("STRATO_CLIENT_PORT", "0")))
        head.activity_sources.append(agent.client_activity)
        head.activity_sources.append(agent.durable_activity)
        connect_in_process(head, agent)
        head.local_node = node_id   # never told to exit: the head's process is its own
        head_address = agent.address
        agent.head.send((m.REGISTER, node_id, agent.address, resources, labels))
        agent.durable_store = head_store
        agent.restore_durable()
    else:
        await agent.start(prestart_workers=min(2, int(resources.get("CPU", 0))))
        head_address = args.address
        head_link = HeadLink(head_address, token, agent, creds)
        agent.head = head_link
        try:
            await head_link.connect((m.REGISTER, node_id, agent.address, resources, labels),
                                    timeout=float(os.environ.get("STRATO_JOIN_TIMEOUT", "15")))
        except (AuthenticationError, ConnectionError) as exc:
            print(f"strato: {exc}", file=sys.stderr)
            await agent.stop()
            await server.stop()
            bulk.stop()
            return 3

    join_bundle = None
    if head is not None and creds.ca_key is not None:
        # what `strato start --address A --join-bundle F` needs on another machine
        join_bundle = os.path.join(temp_dir, "join-bundle.json")
        tls.write_join_bundle(join_bundle, address=head_address, token=token, creds=creds)
    token_file = os.path.join(temp_dir, "nodes", f"{short}.token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    info = {"node_id": node_id.hex(), "pid": os.getpid(), "head": bool(args.head),
            "head_address": head_address, "agent_address": agent.address,
            "socket": agent.socket_path, "token_file": token_file, "started": time.time(),
            "client_port": client_port, "bulk_port": agent.bulk_port, "join_bundle": join_bundle, "tls_dir": tls_dir,
            "resources": resources, "temp_dir": temp_dir, "shm_dir": shm_dir}
    node_file = os.path.join(temp_dir, "nodes", f"{short}.json")
    with open(node_file + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(node_file + ".tmp", node_file)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            json.dump(info, f)
        os.rename(args.ready_file + ".tmp", args.ready_file)

    stop = asyncio.Event()
    exit_reason: list[str] = []
    agent.exit_requested = lambda reason: (exit_reason.append(reason), stop.set())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    memdiag.install(loop, temp_dir)
    if args.parent_pid:
        loop.create_task(_watch_parent(args.parent_pid, stop))
    loop.create_task(_heartbeat_loop(agent))
    loop.create_task(_prune_loop(agent))
    if args.spot_notice != "none":
        from strato.runtime import preemption
        loop.create_task(preemption.watch(
            args.spot_notice,
            lambda text: agent.head.send((m.PREEMPTION_NOTICE, node_id, text)),
            interval=float(os.environ.get("STRATO_NOTICE_INTERVAL", "1"))))
    stopping = loop.create_task(stop.wait())
    while True:
        waiters = [stopping] + ([head_link.closed] if head_link is not None else [])
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() or head_link is None:
            break
        # the head went away (crashed, restarting): wait for it to come back and
        # re-register, saying which actors live here, so the cluster resumes
        head_link = await _rejoin(agent, head_address, token, creds, labels, resources,
                                  stop)
        if head_link is None:
            break
    for path in (node_file, token_file):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    await agent.stop()
    if head is not None:
        await head.stop()
        head_store.close()
        for suffix in ("", "-wal", "-shm"):   # a clean stop ends the cluster: nothing to resume
            try:
                os.unlink(head_store.path + suffix)
            except FileNotFoundError:
                pass
    await server.stop()
    bulk.stop()
    return 4 if exit_reason else 0


async def _rejoin(agent: NodeAgent, head_address: str, token: str, creds, labels: dict,
                  resources: dict, stop: asyncio.Event) -> HeadLink | None:
    """Reconnect to a head that went away, for ``STRATO_HEAD_RECONNECT_S`` (30 s); the
    new registration lists the actors this node hosts. None: it did not come back."""
    window = float(os.environ.get("STRATO_HEAD_RECONNECT_S", "30"))
    log.error("lost the connection to the head at %s; reconnecting for up to %.0fs",
              head_address, window)
    agent.head_lost()
    deadline = time.monotonic() + window
    while not stop.is_set() and time.monotonic() < deadline:
        link = HeadLink(head_address, token, agent, creds)
        agent.head = link
        try:
            await link.connect((m.REGISTER, agent.node_id, agent.address, resources, labels,
                                list(agent.actor_workers)), timeout=3)
            log.info("re-registered with the head at %s", head_address)
            return link
        except AuthenticationError as exc:
            log.error("the head at %s refused this node: %s", head_address, exc)
            return None
        except ConnectionError:
            await link.close()
            await asyncio.sleep(0.5)
    log.error("the head at %s did not come back; stopping this node", head_address)
    return None


async def _heartbeat_loop(agent: NodeAgent) -> None:
    interval = float(os.environ.get("STRATO_HEARTBEAT_INTERVAL", "0.2"))
    while True:
        try:
            agent.head.send(agent.heartbeat())
        except Exception:
            log.exception("heartbeat failed")
        await asyncio.sleep(interval)


async def _prune_loop(agent: NodeAgent) -> None:
    """Sweep the agent's function cache now and then (``NodeAgent.prune_functions``)."""
    interval = float(os.environ.get("STRATO_FN_SWEEP_S", "300"))
    while True:
        await asyncio.sleep(interval)
        try:
            dropped = agent.prune_functions()
            if dropped:
                log.info("forgot %d exported function(s) nothing here needs", len(dropped))
        except Exception:
            log.exception("pruning the function cache failed")


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while psutil.pid_exists(pid):
        await asyncio.sleep(0.5)
    stop.set()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m strato.runtime.node")
    p.add_argument("--head", action="store_true")
    p.add_argument("--address", default=None)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=None)
    p.add_argument("--num-cpus", type=float, default=None)
    p.add_argument("--num-gpus", type=float, default=None)
    p.add_argument("--memory", type=float, default=None)
    p.add_argument("--resources", default=None)
    p.add_argument("--labels", default=None)
    p.add_argument("--object-store-memory", type=int, default=None)
    p.add_argument("--node-ip", default=None)
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR)
    p.add_argument("--tls-dir", default=None,
                   help="this node's TLS credentials (default: TEMP_DIR/tls; a head without "
                        "any makes a cluster CA there)")
    p.add_argument("--ready-file", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--spot-notice", choices=["none", "aws", "gcp"], default="none",
                   help="watch this cloud's spot preemption notice and drain on it")
    return p.parse_args(argv)


def _steady_malloc() -> None:
    """Big buffers (4 MB object chunks from other nodes) always come from mmap and go back
    to the system when freed. glibc otherwise raises its mmap threshold after the first
    such free and serves later ones from the heap, which fragments: a node that moves
    objects for days would creep up in RSS without holding anything."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD (fixed)
    except (OSError, AttributeError):
        pass


def main(argv=None) -> None:
    args = parse_args(argv)
    _steady_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(run_node(args)))


if __name__ == "__main__":
    main()
