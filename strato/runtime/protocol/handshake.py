"""The first frame on the head's client endpoint: authentication and versions, in JSON.

A remote driver (the serverless client) connects to the endpoint the head binds on
127.0.0.1 (reached over an SSH tunnel) and sends one length-prefixed JSON object:
``{"token", "session", "versions"}``. The agent compares the token in constant time and
the versions (Python major.minor, cloudpickle, strato) with its own, and answers
``{"ok", "versions", "node_id", "error"}``. Nothing is unpickled before an ``ok``: a
wrong token, a version mismatch or garbage gets an answer (when it can be parsed) and a
closed connection. After ``ok`` the connection carries ordinary frames (``framing``).
"""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import socket
import struct
import sys

from strato.exceptions import AuthenticationError, VersionMismatchError
from strato.runtime.protocol.framing import recv_exactly

_CLOSED = "the client endpoint closed the connection during the handshake"

_LEN = struct.Struct("<I")
MAX_HANDSHAKE = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
VERSION_KEYS = ("python", "cloudpickle", "strato")


def local_versions() -> dict[str, str]:
    """What must match between a client and its cluster for pickles to travel."""
    import cloudpickle

    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "cloudpickle": cloudpickle.__version__,
            "strato": importlib.metadata.version("strato")}


def encode(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return _LEN.pack(len(body)) + body


def mismatches(here: dict, there: dict) -> list[str]:
    return [k for k in VERSION_KEYS if here.get(k) != there.get(k)]


def mismatch_message(client: dict, cluster: dict) -> str:
    """One error naming both sides and the fix."""
    keys = mismatches(client, cluster)
    diffs = ", ".join(f"{k} {client.get(k)} here vs {cluster.get(k)} on the cluster"
                      for k in keys)
    return (f"this client and the cluster run different versions ({diffs}); code and "
            "values would not unpickle on the other side. Use the same versions on both: "
            "install the cluster's versions here (e.g. `pip install "
            + " ".join(f"{k}=={cluster.get(k)}" for k in keys if k != "python")
            + "`), or point the cluster at a matching interpreter (runtime_python in the "
            "cluster config, or a head image with this Python) and run `strato up` again")


def check(hello: object, token: str, versions: dict) -> tuple[dict, str | None]:
    """The agent's side: (answer, error). ``error`` None means accepted."""
    if not isinstance(hello, dict) or not isinstance(hello.get("token"), str) \
            or not isinstance(hello.get("session"), str) or len(hello["session"]) > 64:
        return {"ok": False, "error": "malformed handshake"}, "malformed handshake"
    if not hmac.compare_digest(hello["token"].encode(), token.encode()):
        return {"ok": False, "error": "wrong cluster token"}, "wrong cluster token"
    theirs = hello.get("versions") if isinstance(hello.get("versions"), dict) else {}
    if mismatches(theirs, versions):
        text = mismatch_message(theirs, versions)
        return {"ok": False, "versions": versions, "error": text}, text
    return {"ok": True, "versions": versions}, None


def client_handshake(sock: socket.socket, token: str, session: str,
                     versions: dict | None = None, timeout: float = HANDSHAKE_TIMEOUT) -> dict:
    """The client's side on a connected socket: send the hello, read the answer; raises
    ``AuthenticationError`` or ``VersionMismatchError`` (naming both sides)."""
    versions = versions or local_versions()
    sock.settimeout(timeout)
    try:
        sock.sendall(encode({"token": token, "session": session, "versions": versions}))
        head = recv_exactly(sock, 4, _CLOSED)
        (n,) = _LEN.unpack(head)
        if n > MAX_HANDSHAKE:
            raise ConnectionError("the client endpoint answered with an oversized handshake")
        answer = json.loads(recv_exactly(sock, n, _CLOSED))
    finally:
        sock.settimeout(None)
    if not answer.get("ok"):
        theirs = answer.get("versions")
        if theirs and mismatches(versions, theirs):
            raise VersionMismatchError(mismatch_message(versions, theirs))
        raise AuthenticationError(f"the cluster refused this client: {answer.get('error')}")
    return answer
