"""Cluster YAML: examples load, hashes track the right keys, every mistake says where."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from strato.exceptions import ConfigError
from strato.launcher.config import ClusterConfig, load_config, load_config_from_dict
from strato.providers.base import NodeTypeSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "cluster.example.yaml", *sorted((REPO / "examples/clusters").glob("*.yaml"))]

# Line numbers below refer to this text (line 1 is "cluster_name").
BASE = """\
cluster_name: t
max_workers: 4
provider:
  type: aws
  region: us-east-1
available_node_types:
  head:
    node_config: {InstanceType: m5.large}
    resources: {CPU: 2}
  gpu:
    node_config: {InstanceType: g5.xlarge}
    resources: {CPU: 4, GPU: 1}
    min_workers: 0
    max_workers: 2
    spot: true
head_node_type: head
setup_commands:
  - echo hi
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).replace(str(path), "cluster.yaml")


# ---------------------------------------------------------------- good files
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_without_warnings(path: Path) -> None:
    config = load_config(path)
    assert config.warnings == []
    assert config.head_node_type in config.available_node_types
    for name in config.available_node_types:
        assert isinstance(config.node_type_spec(name), NodeTypeSpec)


def test_examples_cover_the_issue() -> None:
    aws = load_config(REPO / "cluster.example.yaml")
    gpu = next(t for t in aws.available_node_types.values() if t.spot)
    assert gpu.fallback_to_on_demand and gpu.zones == ["us-east-1a", "us-east-1b"]
    gcp = load_config(REPO / "examples/clusters/gcp.yaml")
    assert any("guestAccelerators" in t.node_config for t in gcp.available_node_types.values())
    ssh = load_config(REPO / "examples/clusters/ssh.yaml")
    assert ssh.provider.head_ip and ssh.runtime_python_for(ssh.head_node_type)
    local = load_config(REPO / "examples/clusters/local.yaml")
    assert any("spot-cpu" in t.resources for t in local.available_node_types.values())


def test_defaults_follow_ray(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.auth.ssh_user == "ubuntu"
    assert config.idle_timeout_minutes == 5 and config.upscaling_speed == 1.0
    assert config.available_node_types["head"].max_workers == 0  # head type: no copies
    config = load_config(write(tmp_path, BASE.replace("    max_workers: 2\n", "")))
    assert config.available_node_types["gpu"].max_workers == 4  # the global max
    local = load_config_from_dict({"provider": {"type": "local"}, "head_node_type": "h",
                                   "available_node_types": {"h": {}}})
    assert local.auth.ssh_user  # the current user, not "ubuntu"
    assert local.cluster_name == "default" and local.autoscaler.tick_seconds == 5


def test_helpers(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        head_setup_commands: [echo head]
        worker_setup_commands: [echo worker]
        runtime_python: /opt/py/bin/python
        """)
    config = load_config(write(tmp_path, text))
    assert config.head_setup() == ["echo hi", "echo head"]
    assert config.worker_setup("gpu") == ["echo hi", "echo worker"]
    assert config.runtime_python_for("gpu") == "/opt/py/bin/python"
    spec = config.node_type_spec("gpu")
    assert spec.spot and spec.resources == {"CPU": 4.0, "GPU": 1.0}
    with pytest.raises(ConfigError, match="unknown node type 'nope'"):
        config.node_type_spec("nope")


def test_provider_extras_kept_and_round_trip(tmp_path: Path) -> None:
    text = BASE.replace("  region: us-east-1\n",
                        "  region: us-east-1\n  security_group: {GroupName: sg}\n")
    config = load_config(write(tmp_path, text))
    assert config.provider.extras == {"security_group": {"GroupName": "sg"}}
    as_dict = config.to_dict()
    assert as_dict["provider"]["security_group"] == {"GroupName": "sg"}
    again = load_config_from_dict(as_dict)
    assert again.to_dict() == as_dict
    assert again.launch_hash("gpu") == config.launch_hash("gpu")


# ---------------------------------------------------------------- hashes
def test_launch_hash_tracks_node_config_not_setup(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, BASE))
    bigger = load_config(write(tmp_path, BASE.replace("g5.xlarge", "g5.2xlarge")))
    new_setup = load_config(write(tmp_path, BASE.replace("echo hi", "echo bye")))
    assert base.launch_hash("gpu") != bigger.launch_hash("gpu")
    assert base.launch_hash("head") == bigger.launch_hash("head")
    assert base.launch_hash("gpu") == new_setup.launch_hash("gpu")
    assert base.setup_hash("gpu") != new_setup.setup_hash("gpu")
    assert base.setup_hash("gpu") == bigger.setup_hash("gpu")
    assert base.launch_hash("gpu") == load_config(write(tmp_path, BASE)).launch_hash("gpu")


def test_setup_hash_sees_file_mount_contents(tmp_path: Path) -> None:
    mounted = tmp_path / "app.py"
    mounted.write_text("v1")
    text = BASE + f"file_mounts:\n  /home/ubuntu/app.py: {mounted}\n"
    before = load_config(write(tmp_path, text)).setup_hash("gpu")
    mounted.write_text("v2")
    assert load_config(write(tmp_path, text)).setup_hash("gpu") != before


# ---------------------------------------------------------------- bad files
def test_typo_names_key_line_and_suggestion(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("    min_workers: 0", "    min_worker: 0"))
    assert msg == ("cluster.yaml:13: available_node_types.gpu.min_worker: unknown key; "
                   "did you mean 'min_workers'?")


def test_top_level_typo(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("setup_commands:", "setup_comands:"))
    assert "cluster.yaml:17: setup_comands: unknown key; did you mean 'setup_commands'?" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("min_workers: 0", "min_workers: many"))
    assert "cluster.yaml:13: available_node_types.gpu.min_workers: expected an integer " \
           "(got 'many')" in msg
    msg = errors_of(tmp_path, BASE.replace("  - echo hi", "  - 5"))
    assert "cluster.yaml:18: setup_commands[0]: expected a string (got 5)" in msg


def test_missing_head_node_type(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("head_node_type: head\n", ""))
    assert "cluster.yaml:1: head_node_type: required key missing" in msg


def test_bad_head_node_type(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("head_node_type: head", "head_node_type: haed"))
    assert "cluster.yaml:16: head_node_type: 'haed' is not a key of available_node_types; " \
           "did you mean 'head'?" in msg


def test_min_greater_than_max(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("min_workers: 0", "min_workers: 3"))
    assert "cluster.yaml:13: available_node_types.gpu.min_workers: min_workers (3) is " \
           "greater than max_workers (2)" in msg


def test_negative_resource(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("GPU: 1", "GPU: -1"))
    assert "cluster.yaml:12: available_node_types.gpu.resources.GPU: must be >= 0 " \
           "(got -1" in msg


def test_unknown_provider_type(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("type: aws", "type: asw"))
    assert "cluster.yaml:4: provider.type: unknown provider type 'asw'; expected one of " \
           "aws, gcp, ssh, local; did you mean 'aws'?" in msg


def test_provider_requirements(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("  region: us-east-1\n", ""))
    assert "cluster.yaml:3: provider.region: required for provider type 'aws'" in msg
    msg = errors_of(tmp_path, BASE.replace("type: aws", "type: gcp"))
    assert "cluster.yaml:3: provider.project_id: required for provider type 'gcp'" in msg
    assert "cluster.yaml:10: available_node_types.gpu.zones: provider type 'gcp' needs" in msg
    msg = errors_of(tmp_path, BASE.replace("type: aws", "type: ssh"))
    assert "cluster.yaml:3: provider.head_ip: required for provider type 'ssh'" in msg
    msg = errors_of(tmp_path, BASE.replace("  type: aws\n", ""))
    assert "cluster.yaml:3: provider.type: required key missing; one of aws" in msg


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("    spot: true", "    spot: [true"))
    assert msg.startswith("cluster.yaml:")
    assert "(yaml): YAML syntax error" in msg
    line = int(msg.split(":")[1])
    assert 15 <= line <= 17


def test_empty_and_non_mapping(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "# nothing\n").startswith(
        "cluster.yaml:1: (top level): the file is empty")
    assert "cluster.yaml:1: (top level): the top level must be a mapping" in errors_of(
        tmp_path, "- a\n- b\n")


def test_duplicate_key(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE + "cluster_name: again\n")
    assert "cluster.yaml:19: cluster_name: duplicate key" in msg


def test_all_problems_listed_in_line_order(tmp_path: Path) -> None:
    text = (BASE.replace("type: aws", "type: azure")
            .replace("min_workers: 0", "min_worker: 0")
            .replace("head_node_type: head", "head_node_type: cpu"))
    lines = errors_of(tmp_path, text).splitlines()
    assert [line.split(":")[1] for line in lines] == ["4", "13", "16"]


def test_ray_only_keys_warn_not_fail(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        head_start_ray_commands:
          - ray start --head
        docker: {image: rayproject/ray}
        """)
    text = text.replace("    spot: true", "    spot: true\n    docker: {image: x}")
    path = write(tmp_path, text)
    config = load_config(path)
    assert isinstance(config, ClusterConfig)
    warnings = [w.replace(str(path), "cluster.yaml") for w in config.warnings]
    assert warnings[0].startswith("cluster.yaml:16: available_node_types.gpu.docker: Ray-only")
    assert warnings[1].startswith("cluster.yaml:20: head_start_ray_commands: Ray-only key, "
                                  "ignored by strato")
    assert warnings[2].startswith("cluster.yaml:22: docker: Ray-only")
    assert "docker" not in config.to_dict()


def test_dict_source_has_no_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_from_dict({"provider": {"type": "local"}, "head_node_type": "h",
                               "available_node_types": {"h": {"min_worker": 1}}})
    assert str(info.value) == ("<dict>: available_node_types.h.min_worker: unknown key; "
                               "did you mean 'min_workers'?")
