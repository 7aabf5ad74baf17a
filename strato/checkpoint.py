"""Checkpoints that survive a spot preemption: ``save(key, obj)`` / ``load(key)``.

Where they go: ``uri=`` or ``STRATO_CHECKPOINT_URI`` when set (a local directory,
``file://``, ``s3://bucket/prefix``, ``gs://bucket/prefix``); otherwise the head node's
disk, reached through the runtime (``HeadClient``: this process's connection, or the
node running on this machine), so a worker's replacement on another machine finds what
the preempted one saved.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import cloudpickle

from strato.localfiles import atomic_write
from strato.runtime.head_client import HeadClient

__all__ = ["save", "load", "delete"]

_MISSING = object()


def _target(uri: str | None) -> str | None:
    return uri or os.environ.get("STRATO_CHECKPOINT_URI") or None


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"checkpoint key must be a non-empty string, got {key!r}")


def save(key: str, obj: Any, *, uri: str | None = None) -> None:
    """Store ``obj`` under ``key``, replacing any earlier checkpoint atomically."""
    _check_key(key)
    data = cloudpickle.dumps(obj, protocol=5)
    target = _target(uri)
    if target is None:
        with HeadClient() as head:
            head.checkpoint_save(key, data)
    else:
        _backend(target).put(key, data)


def load(key: str, default: Any = None, *, uri: str | None = None) -> Any:
    """The object last saved under ``key``, or ``default`` if there is none."""
    _check_key(key)
    target = _target(uri)
    if target is None:
        with HeadClient() as head:
            data = head.checkpoint_load(key)
    else:
        data = _backend(target).get(key)
    return default if data is None else cloudpickle.loads(data)


def delete(key: str, *, uri: str | None = None) -> bool:
    _check_key(key)
    target = _target(uri)
    if target is None:
        with HeadClient() as head:
            return head.checkpoint_delete(key)
    return _backend(target).delete(key)


class _LocalDir:
    def __init__(self, path: str):
        self.path = path

    def _file(self, key: str) -> str:
        safe = urllib.parse.quote(key, safe="")
        return os.path.join(self.path, safe)

    def put(self, key: str, data: bytes) -> None:
        os.makedirs(self.path, exist_ok=True)
        atomic_write(self._file(key), data)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self._file(key))
            return True
        except FileNotFoundError:
            return False


class _S3:
    def __init__(self, bucket: str, prefix: str):
        import boto3  # lazy: only S3 users need it
        self.client = boto3.client("s3")
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete(self, key: str) -> bool:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True


class _GCS:
    def __init__(self, bucket: str, prefix: str):
        try:
            from google.cloud import storage  # lazy: only GCS users need it
        except ImportError:
            raise ImportError("gs:// checkpoints need google-cloud-storage: "
                              "pip install google-cloud-storage") from None
        self.bucket = storage.Client().bucket(bucket)
        self.prefix = prefix.strip("/")

    def _blob(self, key: str):
        return self.bucket.blob(f"{self.prefix}/{key}" if self.prefix else key)

    def put(self, key: str, data: bytes) -> None:
        self._blob(key).upload_from_string(data)

    def get(self, key: str) -> bytes | None:
        blob = self._blob(key)
        return blob.download_as_bytes() if blob.exists() else None

    def delete(self, key: str) -> bool:
        blob = self._blob(key)
        if blob.exists():
            blob.delete()
            return True
        return False


def _backend(uri: str):
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        return _LocalDir(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        return _S3(parsed.netloc, parsed.path)
    if parsed.scheme == "gs":
        return _GCS(parsed.netloc, parsed.path)
    raise ValueError(f"checkpoint uri {uri!r}: use a directory, file://, s3:// or gs://")
