"""The bulk channel on its own (runtime/bulk.py): a server and a client in this process,
objects pulled byte-exact in parts at any offset, a missing object answered with a no
on a connection that stays usable, and a wrong range refused."""

from __future__ import annotations

import os
import threading

import pytest

from strato.runtime import bulk, tls

TOKEN = "bulk-test-token"
NODE = b"n" * 16


@pytest.fixture(scope="module")
def creds():
    return tls.new_cluster("bulk-test")


@pytest.fixture
def ends(tmp_path, creds, monkeypatch):
    # a small bounce buffer: a few-MB object goes through it many times, ending mid-way
    monkeypatch.setattr(bulk, "_BOUNCE", 64 * 1024 + 7)
    store = tmp_path / "store"
    spill = tmp_path / "spill"
    store.mkdir()
    spill.mkdir()
    server = bulk.BulkServer(creds, TOKEN, lambda: (str(store), str(spill)))
    port = server.start("127.0.0.1")
    client = bulk.BulkClient(server.client_ctx, TOKEN, timeout=30.0)
    yield store, port, client, tmp_path
    server.stop()


def _object(store, size: int) -> tuple[bytes, bytes]:
    oid = os.urandom(16)
    data = os.urandom(size)
    (store / oid.hex()).write_bytes(data)
    return oid, data


def _pull(client, port, oid, size, parts, dest) -> bytes:
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        errors = []

        def one(start, length):
            try:
                client.fetch_into(NODE, "127.0.0.1", port, oid, fd, size, start, length)
            except Exception as exc:   # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=one, args=p) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
    finally:
        os.close(fd)
    with open(dest, "rb") as f:
        return f.read()


def test_pull_in_parallel_parts_is_byte_exact(ends):
    store, port, client, tmp = ends
    size = 3 * 1024 * 1024 + 12345
    oid, data = _object(store, size)
    half = size // 2 + 1                       # odd offset: not page-aligned
    got = _pull(client, port, oid, size, [(0, half), (half, size - half)], tmp / "a")
    assert got == data
    # again on the kept connections, and whole in one stream
    assert _pull(client, port, oid, size, [(0, size)], tmp / "b") == data
    # a part alone lands at its place, the rest of the file stays zero
    got = _pull(client, port, oid, size, [(4097, 100_000)], tmp / "c")
    assert got[4097:104097] == data[4097:104097]
    assert got[:4097] == bytes(4097) and got[104097:] == bytes(size - 104097)


def test_missing_object_is_a_no_and_the_connection_stays_usable(ends):
    store, port, client, tmp = ends
    oid, data = _object(store, 200_000)
    with pytest.raises(ConnectionError, match="not in that node's store"):
        _pull(client, port, os.urandom(16), 10, [(0, 10)], tmp / "x")
    assert _pull(client, port, oid, len(data), [(0, len(data))], tmp / "y") == data


def test_a_range_past_the_end_is_refused(ends):
    store, port, client, tmp = ends
    oid, _ = _object(store, 1000)
    with pytest.raises(ConnectionError, match="expected"):
        _pull(client, port, oid, 2000, [(0, 2000)], tmp / "z")


def test_a_dead_node_is_never_dialled(ends):
    store, port, client, tmp = ends
    oid, data = _object(store, 1000)
    assert _pull(client, port, oid, 1000, [(0, 1000)], tmp / "p") == data
    client.cancel_node(NODE)
    with pytest.raises(ConnectionError, match="dead"):
        _pull(client, port, oid, 1000, [(0, 1000)], tmp / "q")
