"""Watch the cloud's spot preemption notice from inside a node.

AWS serves ``/latest/meta-data/spot/instance-action`` (404 until a notice, then JSON with
the action and time); GCP serves ``/computeMetadata/v1/instance/preempted`` (``FALSE``
then ``TRUE``). Base URLs are configurable so tests serve notices from a local server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import urllib.error
import urllib.request

log = logging.getLogger("strato.preemption")

AWS_DEFAULT = "http://169.254.169.254"
GCP_DEFAULT = "http://metadata.google.internal"


def _get(url: str, headers: dict, timeout: float = 2.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _aws_token(base: str) -> str | None:
    req = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None  # IMDSv1 or a test server without tokens


def check_aws(base: str) -> str | None:
    """The notice text if AWS has scheduled this spot instance's interruption."""
    token = _aws_token(base)
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
    return body or "instance-action" if status == 200 else None


def check_gcp(base: str) -> str | None:
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted",
                        {"Metadata-Flavor": "Google"})
    return "preempted" if status == 200 and body.strip().upper() == "TRUE" else None


CHECKS = {"aws": (check_aws, "STRATO_AWS_METADATA_URL", AWS_DEFAULT),
          "gcp": (check_gcp, "STRATO_GCE_METADATA_URL", GCP_DEFAULT)}


async def _in_daemon_thread(fn, *args):
    """Run a blocking call in a daemon thread. Unlike ``asyncio.to_thread`` (whose executor
    ``asyncio.run`` joins), a stopping node never waits for a metadata request in flight
    (one to an unreachable metadata address can block for its whole timeout)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc

        def deliver() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for the answer
            pass

    threading.Thread(target=run, name="spot-notice", daemon=True).start()
    return await future


async def watch(cloud: str, on_notice, interval: float = 1.0) -> None:
    """Poll the metadata service until a notice appears, then call ``on_notice(text)``."""
    check, env, default = CHECKS[cloud]
    base = os.environ.get(env, default).rstrip("/")
    failures = 0
    while True:
        try:
            notice = await _in_daemon_thread(check, base)
            failures = 0
        except (urllib.error.URLError, OSError) as exc:
            failures += 1
            if failures in (1, 10):
                log.warning("cannot read the %s preemption notice at %s: %s", cloud, base, exc)
            notice = None
        if notice:
            log.warning("spot preemption notice from %s: %s", cloud, notice)
            on_notice(notice)
            return
        await asyncio.sleep(interval)
