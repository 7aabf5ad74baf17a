"""AWS without AWS: one moto server per test session, wiped before every test.

Fixtures:
- ``moto_server`` (session): the running ``ThreadedMotoServer``'s base URL.
- ``moto_endpoint`` (function): the same URL after ``POST /moto-api/reset``, with dummy
  credentials, region ``us-east-1`` and ``AWS_ENDPOINT_URL`` pointing at moto, so any
  AWS client the code under test builds talks to loopback only.

Helpers simulate what moto cannot: a spot interruption (through moto's in-process backend,
so the server must run in this process, as here) and capacity errors (raised client-side
before a RunInstances request is built). moto's instances carry real-looking IPs: never
connect to them.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

MOTO_REGION = "us-east-1"
SHUTDOWN_SECONDS = 2.0   # terminated instances sit in shutting-down this long, as on EC2


def _slow_termination(delay: float) -> Callable[[], None]:
    """Make moto's terminated instances go ``shutting-down`` for ``delay`` seconds before
    ``terminated``, as EC2's do: code that terminates and at once lists again must cope
    with instances still on their way out. Returns the undo."""
    from moto.ec2.models.instances import Instance

    original = Instance.terminate

    def terminate(self: Any) -> Any:
        previous = original(self)
        self._state.name, self._state.code = "shutting-down", 32

        def finish() -> None:
            if self._state.name == "shutting-down":
                self._state.name, self._state.code = "terminated", 48

        timer = threading.Timer(delay, finish)
        timer.daemon = True
        timer.start()
        return previous

    Instance.terminate = terminate  # type: ignore[method-assign]
    return lambda: setattr(Instance, "terminate", original)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Start one moto server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    undo = _slow_termination(SHUTDOWN_SECONDS)
    host, port = server._server.server_address[:2]  # port=0: ask the bound socket
    try:
        yield f"http://{host}:{port}"
    finally:
        undo()
        server.stop()


@pytest.fixture(scope="session")
def moto_bridge_server(moto_server: str, ssh_host_network: Any) -> Iterator[str]:
    """The same moto (its state is this process's) also on the SSH test hosts' bridge, so
    a monitor running on a test host can reach it, as a head reaches the EC2 API."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=ssh_host_network.bridge_ip, port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def monitor_env_for(endpoint: str) -> dict[str, str]:
    """What a monitor on a test host needs to call moto: endpoint, dummy credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": MOTO_REGION,
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def map_instances_to_hosts(monkeypatch: pytest.MonkeyPatch, address_map: Any,
                           hosts_by_kind: dict[str, list[Any]]) -> list[str]:
    """Map every instance moto creates, whoever asks for it (the test or a monitor on a
    test host), to a test host by its ``strato-node-kind`` tag, round robin, before the
    RunInstances answer leaves moto. Returns the ids in order of creation."""
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    created: list[str] = []
    turn = {kind: 0 for kind in hosts_by_kind}

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original(self, *args, **kwargs)
        for inst in reservation.instances:
            tags = {t["key"]: t["value"] for t in inst.get_tags()}
            kind = tags.get("strato-node-kind")
            if kind in hosts_by_kind:
                pool = hosts_by_kind[kind]
                address_map.add(inst.id, pool[turn[kind] % len(pool)])
                turn[kind] += 1
            created.append(inst.id)
        return reservation

    monkeypatch.setattr(InstanceBackend, "run_instances", run_instances)
    return created


def honour_client_tokens() -> Callable[[], None]:
    """Make moto answer a RunInstances whose ClientToken it has seen with that launch's
    reservation, as EC2 does (moto 5.2 launches again). Returns the undo."""
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    seen: dict[str, Any] = {}

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = kwargs.get("client_token")
        if token and token != "ABCDE" and token in seen:  # moto's default when absent
            return seen[token]
        reservation = original(self, *args, **kwargs)
        if token and token != "ABCDE":
            seen[token] = reservation
        return reservation

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]
    return lambda: setattr(InstanceBackend, "run_instances", original)


@pytest.fixture
def moto_endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch,
                  tmp_path_factory: pytest.TempPathFactory) -> str:
    """Reset moto's state and point AWS credentials, region and endpoint at it."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    empty = tmp_path_factory.mktemp("aws-config") / "none"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_EC2"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", MOTO_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


def interrupt_spot_instance(instance_id: str, region: str = MOTO_REGION) -> None:
    """Terminate an instance the way EC2 reclaims spot capacity (moto 5.2 internals)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2 import ec2_backends
    from moto.ec2.models.instances import StateReason

    inst = ec2_backends[DEFAULT_ACCOUNT_ID][region].get_instance(instance_id)
    inst.terminate()
    inst._reason = "Server.SpotInstanceTermination"
    inst.state_reason = StateReason("Server.SpotInstanceTermination: Spot instance termination",
                                    "Server.SpotInstanceTermination")


def inject_capacity_error(ec2_client: Any, zones: Sequence[str] | None = None,
                          code: str = "InsufficientInstanceCapacity",
                          instance_types: Sequence[str] | None = None) -> Callable[[], None]:
    """Make RunInstances on this client fail with ``code`` in ``zones`` (None: everywhere)
    for ``instance_types`` (None: every type).

    The zone comes from ``Placement.AvailabilityZone`` or the subnet's zone. Returns a
    function that removes the injection.
    """
    from botocore.exceptions import ClientError

    subnet_zones: dict[str, str] = {}

    def zone_of(params: dict[str, Any]) -> str | None:
        zone = (params.get("Placement") or {}).get("AvailabilityZone")
        subnet = params.get("SubnetId") or next(
            (n.get("SubnetId") for n in params.get("NetworkInterfaces") or ()), None)
        if zone or not subnet:
            return zone
        if subnet not in subnet_zones:
            found = ec2_client.describe_subnets(SubnetIds=[subnet])["Subnets"]
            subnet_zones[subnet] = found[0]["AvailabilityZone"] if found else ""
        return subnet_zones[subnet] or None

    def handler(params: dict[str, Any], **_: Any) -> None:
        zone = zone_of(params)
        if instance_types is not None and params.get("InstanceType") not in instance_types:
            return
        if zones is None or zone in zones:
            raise ClientError({"Error": {
                "Code": code,
                "Message": f"We currently do not have sufficient capacity in {zone} (injected)",
            }}, "RunInstances")

    event = "before-parameter-build.ec2.RunInstances"
    unique_id = f"strato-capacity-error-{id(handler)}"
    ec2_client.meta.events.register(event, handler, unique_id=unique_id)
    return lambda: ec2_client.meta.events.unregister(event, unique_id=unique_id)


def set_spot_prices(monkeypatch: pytest.MonkeyPatch,
                    prices: dict[tuple[str, str], float]) -> None:
    """Make moto's DescribeSpotPriceHistory answer these (instance type, zone) prices
    (moto's own are all 0.00001); pairs not given keep moto's dummy."""
    from moto.ec2.responses.spot_instances import SpotInstances

    original = SpotInstances.describe_spot_price_history

    def describe_spot_price_history(self: Any) -> Any:
        result = original(self)
        for item in result.result["SpotPriceHistory"]:
            price = prices.get((item["InstanceType"], item["AvailabilityZone"]))
            if price is not None:
                item["SpotPrice"] = f"{price:.6f}"
        return result

    monkeypatch.setattr(SpotInstances, "describe_spot_price_history",
                        describe_spot_price_history)
