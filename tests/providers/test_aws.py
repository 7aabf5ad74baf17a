"""AWSProvider against a moto server: prepare, spot and on-demand launches, preemption,
capacity errors, tags, termination. No test connects to an instance address."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strato.exceptions import CapacityError, ProviderError
from strato.providers import provider_class
from strato.providers.aws import AWSProvider, make_ec2_client
from strato.providers.base import (
    TAG_CLUSTER,
    TAG_KIND,
    TAG_NODE_TYPE,
    TAG_STATUS,
    NodeState,
    NodeTypeSpec,
)
from tests.harness.moto_server import (
    honour_client_tokens,
    inject_capacity_error,
    interrupt_spot_instance,
)

REGION = "us-east-1"
HEAD = NodeTypeSpec(name="head", node_config={"InstanceType": "m5.large"})
WORKER = NodeTypeSpec(name="gpu", node_config={"InstanceType": "g5.xlarge"}, spot=True,
                      zones=("us-east-1b", "us-east-1c"), max_price=0.5)


def cluster_config(**auth: str) -> dict[str, Any]:
    return {
        "cluster_name": "demo",
        "provider": {"type": "aws", "region": REGION},
        "auth": {"ssh_user": "ubuntu", **auth},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"node_config": dict(HEAD.node_config)},
            "gpu": {"node_config": dict(WORKER.node_config), "spot": True,
                    "zones": list(WORKER.zones)},
        },
    }


def tags_for(spec: NodeTypeSpec, kind: str) -> dict[str, str]:
    return {TAG_KIND: kind, TAG_NODE_TYPE: spec.name}


@pytest.fixture
def provider(moto_endpoint: str, strato_home: Path) -> AWSProvider:
    return AWSProvider({"type": "aws", "region": REGION, "availability_zone": "us-east-1a",
                        "endpoint_url": moto_endpoint}, "demo")


def write_ed25519_key(path: Path, fmt: str = "openssh") -> str:
    """Write a fresh private key (fast, unlike RSA) and return its public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private_format = (serialization.PrivateFormat.OpenSSH if fmt == "openssh"
                      else serialization.PrivateFormat.PKCS8)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, private_format,
                                       serialization.NoEncryption()))
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def prepared(provider: AWSProvider, tmp_path: Path) -> AWSProvider:
    """A prepared provider using an imported key (moto's create_key_pair makes slow RSA)."""
    write_ed25519_key(tmp_path / "id_ed25519")
    provider.prepare(cluster_config(ssh_private_key=str(tmp_path / "id_ed25519")))
    return provider


def describe(provider: AWSProvider, node_id: str) -> dict[str, Any]:
    reply = provider.ec2.describe_instances(InstanceIds=[node_id])
    return reply["Reservations"][0]["Instances"][0]


def test_registered_as_the_aws_provider() -> None:
    assert provider_class("aws") is AWSProvider


def test_boto3_is_imported_lazily() -> None:
    code = "import sys, strato.providers.aws; sys.exit('boto3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_prepare_creates_key_pair_and_security_group_idempotently(
        provider: AWSProvider, strato_home: Path) -> None:
    first = provider.prepare(cluster_config())
    second = provider.prepare(cluster_config())
    assert first == second

    assert first["key_name"] == "strato-demo"
    pem = Path(first["private_key_path"])
    assert pem == strato_home / "keys" / "strato-demo.pem"
    assert "PRIVATE KEY" in pem.read_text()
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert [k["KeyName"] for k in provider.ec2.describe_key_pairs()["KeyPairs"]] == ["strato-demo"]

    groups = provider.ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["strato-demo"]}])["SecurityGroups"]
    assert len(groups) == 1 and groups[0]["GroupId"] == first["security_group_id"]
    rules = groups[0]["IpPermissions"]
    assert len(rules) == 2  # a second prepare added nothing
    ssh = next(r for r in rules if r["IpProtocol"] == "tcp")
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["0.0.0.0/0"]
    internal = next(r for r in rules if r["IpProtocol"] == "-1")
    assert [p["GroupId"] for p in internal["UserIdGroupPairs"]] == [first["security_group_id"]]

    assert set(first["subnets"]) == {"us-east-1a", "us-east-1b", "us-east-1c"}
    for zone, subnet_id in first["subnets"].items():
        subnet = provider.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]
        assert subnet["AvailabilityZone"] == zone and subnet["DefaultForAz"]


@pytest.mark.parametrize("fmt", ["openssh", "pem"])
def test_prepare_imports_the_users_key(provider: AWSProvider, tmp_path: Path,
                                       strato_home: Path, fmt: str) -> None:
    key_path = tmp_path / "id_ed25519"
    public = write_ed25519_key(key_path, fmt)
    result = provider.prepare(cluster_config(ssh_private_key=str(key_path)))
    assert result["private_key_path"] == str(key_path)
    assert not (strato_home / "keys").exists()
    stored = provider.ec2.describe_key_pairs(KeyNames=["strato-demo"], IncludePublicKey=True)
    assert stored["KeyPairs"][0]["PublicKey"].split()[:2] == public.split()[:2]

    # A changed key is never put in place of the pair (another owner's cluster of this
    # name may use it): it gets a pair named after itself, reused by the next prepare.
    public2 = write_ed25519_key(key_path, fmt)
    second = provider.prepare(cluster_config(ssh_private_key=str(key_path)))
    assert provider.prepare(cluster_config(ssh_private_key=str(key_path))) == second
    assert second["key_name"].startswith("strato-demo-")
    stored = provider.ec2.describe_key_pairs(KeyNames=["strato-demo"], IncludePublicKey=True)
    assert stored["KeyPairs"][0]["PublicKey"].split()[:2] == public.split()[:2]
    stored = provider.ec2.describe_key_pairs(KeyNames=[second["key_name"]],
                                             IncludePublicKey=True)
    assert stored["KeyPairs"][0]["PublicKey"].split()[:2] == public2.split()[:2]


def test_a_key_pair_of_another_owner_is_never_replaced(
        moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def owner(name: str) -> AWSProvider:
        monkeypatch.setenv("STRATO_HOME", str(tmp_path / name))
        return AWSProvider({"type": "aws", "region": REGION, "availability_zone": "us-east-1a",
                            "endpoint_url": moto_endpoint, "owner": f"{name}-0123"}, "demo")

    alice = owner("alice").prepare(cluster_config())
    pairs = owner("alice").ec2.describe_key_pairs()["KeyPairs"]
    bob_provider = owner("bob")
    bob = bob_provider.prepare(cluster_config())  # bob has no private key of alice's pair
    assert alice["key_name"] == "strato-demo" and bob["key_name"] == "strato-demo-bob-0123"
    assert Path(bob["private_key_path"]).parent == tmp_path / "bob" / "keys"
    after = {p["KeyName"]: p for p in bob_provider.ec2.describe_key_pairs()["KeyPairs"]}
    assert after["strato-demo"]["KeyFingerprint"] == pairs[0]["KeyFingerprint"]
    assert bob_provider.prepare(cluster_config()) == bob

    # bob's nodes (also those a monitor creates from the facts) boot with bob's key
    [node] = bob_provider.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    fresh = owner("bob")
    fresh.adopt_facts(bob)
    [other] = fresh.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    assert {describe(fresh, n.id)["KeyName"] for n in (node, other)} == {"strato-demo-bob-0123"}

    # a lost private key is never "fixed" by replacing a pair: the error names the way out
    Path(bob["private_key_path"]).unlink()
    with pytest.raises(ProviderError, match="does not hold its private key"):
        owner("bob").prepare(cluster_config())


def test_a_retried_run_instances_whose_answer_was_lost_creates_no_duplicates(
        prepared: AWSProvider) -> None:
    """botocore resends a request whose answer it never got; EC2 (here moto taught to
    honour ClientToken as EC2 does) answers a resent token with the same instances."""
    import urllib.request

    from botocore.exceptions import ConnectionClosedError

    sent: list[str] = []
    real_reservations = honour_client_tokens()

    def lose_first_answer(request: Any, **_: Any) -> None:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        sent.append(body)
        if len(sent) == 1:  # the request reaches EC2, its answer is lost on the way back
            urllib.request.urlopen(urllib.request.Request(
                request.url, data=body.encode(), headers=dict(request.headers),
                method="POST"), timeout=30).read()
            raise ConnectionClosedError(endpoint_url=request.url)

    prepared.ec2.meta.events.register("before-send.ec2.RunInstances", lose_first_answer)
    try:
        nodes = prepared.create_nodes(HEAD, 2, tags_for(HEAD, "head"))
    finally:
        real_reservations()
    tokens = [dict(p.split("=", 1) for p in b.split("&"))["ClientToken"] for b in sent]
    assert len(sent) == 2 and tokens[0] == tokens[1] and len(tokens[0]) >= 32
    running = [n for n in prepared.list_nodes() if n.is_alive]
    assert sorted(n.id for n in running) == sorted(n.id for n in nodes) and len(nodes) == 2

    # another logical launch gets another token
    prepared.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    assert len({dict(p.split("=", 1) for p in b.split("&"))["ClientToken"]
                for b in sent}) == 2


def test_create_on_demand_head_and_spot_workers(prepared: AWSProvider) -> None:
    [head] = prepared.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    workers = prepared.create_nodes(WORKER, 2, tags_for(WORKER, "worker"))

    assert not head.spot and head.zone == "us-east-1a" and head.instance_type == "m5.large"
    assert len(workers) == 2 and all(w.spot for w in workers)
    assert {w.zone for w in workers} == {"us-east-1b"}  # first of spec.zones

    head_desc = describe(prepared, head.id)
    assert "InstanceLifecycle" not in head_desc
    assert head_desc["KeyName"] == "strato-demo"
    assert [g["GroupName"] for g in head_desc["SecurityGroups"]] == ["strato-demo"]
    assert head_desc["SubnetId"] == prepared._prepared["subnets"]["us-east-1a"]
    for worker in workers:
        desc = describe(prepared, worker.id)
        assert desc["InstanceLifecycle"] == "spot"
        tags = {t["Key"]: t["Value"] for t in desc["Tags"]}
        assert tags[TAG_CLUSTER] == "demo"
        assert tags[TAG_KIND] == "worker"
        assert tags[TAG_NODE_TYPE] == "gpu"
        assert tags["Name"] == "strato-demo-worker"
        assert desc["ImageId"]  # default AMI was looked up


def test_spot_override_launches_on_demand_in_given_zone(prepared: AWSProvider) -> None:
    [node] = prepared.create_nodes(WORKER, 1, tags_for(WORKER, "worker"),
                                   zone="us-east-1c", spot=False)
    assert not node.spot and node.zone == "us-east-1c"
    assert "InstanceLifecycle" not in describe(prepared, node.id)


def test_list_nodes_filters_by_tags_and_set_tags(prepared: AWSProvider,
                                                 moto_endpoint: str) -> None:
    [head] = prepared.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    workers = prepared.create_nodes(WORKER, 2, tags_for(WORKER, "worker"))
    other = AWSProvider({"region": REGION, "endpoint_url": moto_endpoint}, "other")
    other.prepare(cluster_config(ssh_private_key=prepared._prepared["private_key_path"]))
    other.create_nodes(HEAD, 1, tags_for(HEAD, "head"))

    assert {n.id for n in prepared.list_nodes()} == {head.id, *(w.id for w in workers)}
    assert [n.id for n in prepared.list_nodes({TAG_KIND: "head"})] == [head.id]
    listed = prepared.list_nodes({TAG_NODE_TYPE: "gpu"})
    assert {n.id for n in listed} == {w.id for w in workers}
    assert all(n.spot and n.state in (NodeState.PENDING, NodeState.RUNNING) for n in listed)
    assert all(n.private_ip and n.launch_time and n.zone == "us-east-1b" for n in listed)
    assert all(n.node_type == "gpu" and n.kind == "worker" for n in listed)

    prepared.set_tags(workers[0].id, {TAG_STATUS: "up-to-date"})
    [tagged] = prepared.list_nodes({TAG_STATUS: "up-to-date"})
    assert tagged.id == workers[0].id and tagged.tags[TAG_STATUS] == "up-to-date"


def test_create_nodes_works_from_a_fresh_provider(prepared: AWSProvider,
                                                  moto_endpoint: str) -> None:
    fresh = AWSProvider({"region": REGION, "endpoint_url": moto_endpoint}, "demo")
    [node] = fresh.create_nodes(HEAD, 1, tags_for(HEAD, "head"), zone="us-east-1c")
    desc = describe(fresh, node.id)
    assert desc["SecurityGroups"][0]["GroupId"] == prepared._prepared["security_group_id"]
    assert desc["KeyName"] == "strato-demo" and node.zone == "us-east-1c"


def test_create_nodes_without_prepare_says_so(provider: AWSProvider) -> None:
    with pytest.raises(ProviderError, match="prepare"):
        provider.create_nodes(HEAD, 1, tags_for(HEAD, "head"))


def test_runtime_resources_from_instance_type(provider: AWSProvider) -> None:
    gpu = provider.runtime_resources(WORKER)
    assert gpu["GPU"] == 1 and gpu["accelerator_type:A10G"] == 1
    assert gpu["CPU"] == 4
    assert gpu["memory"] == pytest.approx(16384 * 1024 * 1024 * 0.7, rel=1e-6)

    explicit = NodeTypeSpec(name="gpu", node_config={"InstanceType": "g5.xlarge"},
                            resources={"CPU": 2, "custom": 3})
    res = provider.runtime_resources(explicit)
    assert res["CPU"] == 2 and res["custom"] == 3 and res["GPU"] == 1
    assert "GPU" not in provider.runtime_resources(HEAD)


def test_spot_interruption_shows_as_preempted(prepared: AWSProvider) -> None:
    workers = prepared.create_nodes(WORKER, 2, tags_for(WORKER, "worker"))
    interrupt_spot_instance(workers[0].id, REGION)

    alive = prepared.list_nodes({TAG_NODE_TYPE: "gpu"})
    assert [n.id for n in alive] == [workers[1].id]
    everything = {n.id: n for n in prepared.list_nodes(include_terminated=True)}
    gone = everything[workers[0].id]
    assert gone.state is NodeState.TERMINATED and gone.preempted and gone.spot
    assert not everything[workers[1].id].preempted


@pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "VcpuLimitExceeded",
                                  "Unsupported", "SpotMaxPriceTooLow"])
def test_capacity_errors_become_capacity_error(prepared: AWSProvider, code: str) -> None:
    remove = inject_capacity_error(prepared.ec2, zones=["us-east-1b"], code=code)
    with pytest.raises(CapacityError) as info:
        prepared.create_nodes(WORKER, 2, tags_for(WORKER, "worker"))
    err = info.value
    assert (err.zone, err.code, err.node_type, err.spot) == ("us-east-1b", code, "gpu", True)
    assert prepared.list_nodes() == []

    # Another zone still has room; removing the injection restores the first.
    [node] = prepared.create_nodes(WORKER, 1, tags_for(WORKER, "worker"), zone="us-east-1c")
    assert node.zone == "us-east-1c"
    remove()
    assert prepared.create_nodes(WORKER, 1, tags_for(WORKER, "worker"))[0].zone == "us-east-1b"


def test_other_cloud_errors_become_provider_error(prepared: AWSProvider) -> None:
    inject_capacity_error(prepared.ec2, code="InvalidParameterValue")
    with pytest.raises(ProviderError, match="InvalidParameterValue") as info:
        prepared.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    assert not isinstance(info.value, CapacityError)


def test_terminate_nodes(prepared: AWSProvider) -> None:
    [head] = prepared.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    workers = prepared.create_nodes(WORKER, 2, tags_for(WORKER, "worker"))
    ids = [head.id, *(w.id for w in workers)]

    prepared.terminate_nodes(ids)
    assert prepared.list_nodes() == []
    gone = prepared.list_nodes(include_terminated=True)
    assert {n.id for n in gone} == set(ids)
    assert all(n.state is NodeState.TERMINATED and not n.preempted for n in gone)

    # Repeating, or naming an id AWS never knew, is not an error.
    prepared.terminate_nodes([*ids, "i-0123456789abcdef0"])
    prepared.terminate_nodes([])


def test_endpoint_from_environment(moto_endpoint: str, strato_home: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_endpoint)
    assert make_ec2_client({"region": REGION}).meta.endpoint_url == moto_endpoint
    write_ed25519_key(strato_home.parent / "key")
    provider = AWSProvider({"region": REGION}, "demo")
    provider.prepare(cluster_config(ssh_private_key=str(strato_home.parent / "key")))
    [node] = provider.create_nodes(HEAD, 1, tags_for(HEAD, "head"))
    assert [n.id for n in provider.list_nodes()] == [node.id]

    # The service-specific variable beats the generic one; the config beats both.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert make_ec2_client({"region": REGION}).meta.endpoint_url == moto_endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL_EC2")
    assert make_ec2_client({"region": REGION}).meta.endpoint_url == "http://127.0.0.1:9"
    configured = make_ec2_client({"region": REGION, "endpoint_url": moto_endpoint})
    assert configured.meta.endpoint_url == moto_endpoint
    assert configured.meta.region_name == REGION


def test_default_image_and_node_config_passthrough(prepared: AWSProvider) -> None:
    ami = prepared.default_image("m5.large")
    image = prepared.ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert image["Architecture"] == "x86_64"
    assert image["Name"].startswith("ubuntu/images/")  # moto has no DLAMI or jammy image

    other_ami = next(i["ImageId"] for i in prepared.ec2.describe_images(Owners=["amazon"])["Images"]
                     if i["ImageId"] != ami)
    spec = NodeTypeSpec(name="custom", node_config={
        "InstanceType": "t3.micro", "ImageId": other_ami,
        "TagSpecifications": [{"ResourceType": "instance",
                               "Tags": [{"Key": "team", "Value": "ml"}]}],
    })
    [node] = prepared.create_nodes(spec, 1, tags_for(spec, "worker"))
    desc = describe(prepared, node.id)
    assert desc["ImageId"] == other_ami and desc["InstanceType"] == "t3.micro"
    assert node.tags["team"] == "ml" and node.tags[TAG_CLUSTER] == "demo"
