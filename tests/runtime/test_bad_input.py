"""Links between machines are mutual TLS, and bad input never reaches pickle.

Against a real head (``multinode``: head A, nodes B and C joined with A's join bundle):
plaintext gRPC, a certificate from another CA, the right CA with a wrong token, random
and truncated bytes on the gRPC port, and garbage, truncated frames, pickles and wrong
tokens on the head's client endpoint. Every pickle sent would create a canary file if it
were ever loaded; the node must stay healthy throughout.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import grpc
import pytest

from strato.runtime import tls
from strato.runtime.protocol.runtime_pb2 import Frame
from strato.runtime.transport import GRPC_OPTIONS, SERVICE, TOKEN_KEY

pytestmark = pytest.mark.timeout(120)


class _Canary:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_frame(path: str) -> Frame:
    return Frame(payload=pickle.dumps([_Canary(path)], protocol=5))


def _call(channel, method: str, frame: Frame, token: str, timeout: float = 5.0):
    """Send ``frame`` on a stream method; returns the error code (None if it went through)."""
    stream = channel.stream_stream(f"/{SERVICE}/{method}",
                                   request_serializer=Frame.SerializeToString,
                                   response_deserializer=Frame.FromString)
    try:
        for _ in stream(iter([frame]), metadata=((TOKEN_KEY, token),), timeout=timeout):
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return None


def _healthy(strato, multinode) -> None:
    assert sum(n["Alive"] for n in strato.nodes()) == 3

    @strato.remote(resources={"node_b": 0.1})
    def on_b(x):
        return x + 1

    assert strato.get(on_b.remote(41), timeout=30) == 42


def test_plaintext_grpc_is_refused_before_anything_is_unpickled(multinode, tmp_path):
    import strato

    canary = str(tmp_path / "unpickled")
    for address in (multinode.address, multinode.nodes["B"].info["agent_address"]):
        with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            for method in ("Head", "Peer"):
                code = _call(channel, method, _evil_frame(canary), multinode.token)
                assert code == grpc.StatusCode.UNAVAILABLE, (address, method, code)
    assert not os.path.exists(canary)
    _healthy(strato, multinode)


def test_certificate_from_another_ca_is_refused(multinode, tmp_path):
    import strato

    canary = str(tmp_path / "unpickled")
    other = tls.new_cluster("impostor")
    for address in (multinode.address, multinode.nodes["C"].info["agent_address"]):
        with grpc.secure_channel(address, other.channel(),
                                 options=GRPC_OPTIONS + tls.CHANNEL_OPTIONS) as channel:
            for method in ("Head", "Peer"):
                # even with the right token: the handshake fails first
                code = _call(channel, method, _evil_frame(canary), multinode.token)
                assert code == grpc.StatusCode.UNAVAILABLE, (address, method, code)
    assert not os.path.exists(canary)
    _healthy(strato, multinode)


def test_right_certificate_wrong_token_is_refused_unread(multinode, tmp_path):
    import strato

    canary = str(tmp_path / "unpickled")
    _, _, creds = tls.read_join_bundle(multinode.nodes["A"].join_bundle)
    with grpc.secure_channel(multinode.address, creds.channel(),
                             options=GRPC_OPTIONS + tls.CHANNEL_OPTIONS) as channel:
        for method in ("Head", "Peer"):
            for token in ("wrong-token", "", multinode.token[:-1]):
                code = _call(channel, method, _evil_frame(canary), token)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method, token, code)
    assert not os.path.exists(canary)
    _healthy(strato, multinode)


def test_random_and_truncated_bytes_on_the_grpc_port(multinode):
    import strato

    host, port = multinode.address.rsplit(":", 1)
    rng = random.Random(7)
    # an HTTP/2 preface (plaintext gRPC), a truncated TLS ClientHello, random noise
    payloads = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(rng.randrange(256) for _ in range(64)),
                bytes.fromhex("160301020001000200") + os.urandom(40),
                *(os.urandom(rng.randrange(1, 4096)) for _ in range(20))]
    for data in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
    _healthy(strato, multinode)


def _endpoint_answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    return out
                out += part
        except (TimeoutError, ConnectionResetError):
            return out


def test_client_endpoint_refuses_garbage_frames_pickles_and_wrong_tokens(multinode, tmp_path):
    import strato
    from strato.runtime.protocol import handshake

    port = multinode.nodes["A"].info["client_port"]
    canary = str(tmp_path / "unpickled")
    body = pickle.dumps([_Canary(canary)], protocol=5)
    frame = struct.pack("<I", len(body)) + body
    wrong = handshake.encode({"token": "nope", "session": "s",
                              "versions": handshake.local_versions()})
    rng = random.Random(11)
    cases = [frame, frame[:7], b"\xff" * 64, struct.pack("<I", 10) + b"{\"tok",
             struct.pack("<I", 1 << 30) + b"x" * 100, wrong + frame,
             handshake.encode({"token": 5, "session": "s"}) + frame,
             *(os.urandom(rng.randrange(1, 2048)) for _ in range(20))]
    for data in cases:
        answer = _endpoint_answer(port, data)
        if data.startswith(wrong):
            assert b"wrong cluster token" in answer
    assert not os.path.exists(canary)
    _healthy(strato, multinode)


def test_join_bundle_joins_by_hand_and_nothing_else_does(multinode):
    """`strato start --join-bundle F` alone joins (address, token, TLS from F); without
    a bundle a node cannot join, and one with another cluster's bundle is refused."""
    import strato

    bundle = multinode.nodes["A"].join_bundle
    assert bundle and os.stat(bundle).st_mode & 0o777 == 0o600
    with open(bundle) as f:
        assert json.load(f)["address"] == multinode.address
    tls_dir = multinode.nodes["A"].info["tls_dir"]
    assert all(os.stat(os.path.join(tls_dir, n)).st_mode & 0o777 == 0o600
               for n in os.listdir(tls_dir))

    dirs = [tempfile.mkdtemp(prefix="strato-join-") for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATO_")}
    cli = [sys.executable, "-m", "strato.cli", "start", "--node-ip", "127.0.0.1",
           "--num-cpus", "0", "--json"]
    try:
        res = subprocess.run([*cli, "--temp-dir", dirs[0], "--join-bundle", bundle],
                             capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0, res.stderr
        joined = json.loads(res.stdout.strip().splitlines()[-1])
        assert joined["head_address"] == multinode.address
        wait = [n for n in strato.nodes() if n["NodeID"] == joined["node_id"] and n["Alive"]]
        assert wait, "the node that joined with the bundle is not in the cluster"

        # no bundle, right token: refused (no TLS credentials to join with)
        res = subprocess.run([*cli, "--temp-dir", dirs[1], "--address", multinode.address],
                             capture_output=True, text=True, timeout=60,
                             env={**env, "STRATO_TOKEN": multinode.token})
        assert res.returncode != 0 and "join-bundle" in res.stderr

        # another cluster's bundle (an impostor head's CA), right address and token
        other = tempfile.mkdtemp(prefix="strato-other-")
        dirs.append(other)
        creds = tls.new_cluster("other")
        fake = os.path.join(other, "bundle.json")
        tls.write_join_bundle(fake, address=multinode.address, token=multinode.token,
                              creds=creds)
        res = subprocess.run([*cli, "--temp-dir", dirs[2], "--join-bundle", fake],
                             capture_output=True, text=True, timeout=60,
                             env={**env, "STRATO_JOIN_TIMEOUT": "3"})
        assert res.returncode != 0
        assert multinode.token not in res.stderr + res.stdout
    finally:
        from strato.runtime.control import stop_nodes
        for d in dirs:
            stop_nodes(d, timeout=10)
            shutil.rmtree(d, ignore_errors=True)
    from tests.harness.runtime_cluster import wait_until
    wait_until(lambda: sum(n["Alive"] for n in strato.nodes()) == 3, 20, 0.1,
               "the joined node to leave")


def _bulk_request(ctx, port: int, token: bytes, oid: bytes) -> bytes:
    """One request to a node's bulk port: the answer (header and data), or b"" if the
    connection was refused or closed without one."""
    import ssl
    import struct

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    out = b""
    try:
        with ctx.wrap_socket(raw, server_hostname=tls.SAN) as s:
            s.sendall(struct.pack("<I", len(token)) + token + oid + struct.pack("<QQ", 0, 1 << 20))
            while len(out) < 9 or len(out) < 9 + struct.unpack_from("<Q", out, 1)[0]:
                part = s.recv(1 << 20)
                if not part:
                    break
                out += part
    except (ssl.SSLError, OSError):
        pass
    finally:
        raw.close()
    return out


def test_the_bulk_port_serves_only_this_cluster_with_its_token(multinode):
    """The object channel between nodes (runtime/bulk.py): noise and plaintext get
    nothing, another CA's certificate fails the handshake, and the right certificate
    with a wrong token gets not one byte, even for an object that exists."""
    import numpy as np

    import strato
    from strato.runtime import bulk

    port = multinode.nodes["B"].info["bulk_port"]
    assert port
    # an object that lives in B's store
    make = strato.remote(resources={"node_b": 1})(lambda: np.ones(1 << 18))
    ref = make.remote()
    strato.wait([ref], fetch_local=False, timeout=30)
    for data in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                 bytes.fromhex("160301020001000200") + os.urandom(40)):
        answer = _endpoint_answer(port, data)
        assert answer == b"" or answer[0] == 0x15   # nothing, or a TLS alert record
    _, _, creds = tls.read_join_bundle(multinode.nodes["A"].join_bundle)
    _, good_ctx = bulk._contexts(creds)
    _, impostor_ctx = bulk._contexts(tls.new_cluster("impostor"))
    token = multinode.token.encode()
    assert _bulk_request(impostor_ctx, port, token, ref.id) == b""
    for wrong in (b"wrong-token", b"", token[:-1], b"x" * 5000):
        assert _bulk_request(good_ctx, port, wrong, ref.id) == b""
    # the right token gets an answer (an object there: its bytes, one that is not: a no)
    assert len(_bulk_request(good_ctx, port, token, ref.id)) > 1 << 18
    assert _bulk_request(good_ctx, port, token, os.urandom(16))[:1] == b"\x00"
    assert strato.get(ref, timeout=30).sum() == 1 << 18   # pulled A <- B on that channel
    _healthy(strato, multinode)
