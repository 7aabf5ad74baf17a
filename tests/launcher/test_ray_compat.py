"""Ray users bring their cluster YAML: Ray's full examples load with line-numbered
warnings, Ray's spot idioms count as spot, legacy keys become node types, and
rsync_exclude / rsync_filter leave files out of every copy. No processes, no clouds."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato.exceptions import ConfigError
from strato.launcher.config import load_config
from strato.launcher.runner import LocalRunner, OutputSink
from strato.providers.aws import AWSProvider
from strato.providers.base import NodeTypeSpec
from strato.providers.gcp import GCPProvider
from strato.ssh.files import CopyFilter
from tests.launcher.ray_examples import AWS_EXAMPLE, GCP_EXAMPLE, RAY_ONLY_KEYS, line_of

pytestmark = pytest.mark.timeout(30)


def _load(tmp_path: Path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path, load_config(path)


@pytest.mark.parametrize("text, spot_type, needle, max_price", [
    (AWS_EXAMPLE, "ray.worker.default", "MarketType: spot", 0.5),
    (GCP_EXAMPLE, "ray_worker_small", "- preemptible: true", None),
])
def test_rays_full_examples_load_with_warnings_and_spot_noted(tmp_path, text, spot_type,
                                                              needle, max_price):
    path, config = _load(tmp_path, text)
    assert config.warnings == [
        f"{path}:{line_of(text, key + ':')}: {key}: Ray-only key, ignored by strato "
        f"({reason})" for key, reason in (
            (k, type(config).ray_only_keys[k]) for k in RAY_ONLY_KEYS)]
    (note,) = config.notes
    assert note.startswith(f"{path}:{line_of(text, needle)}: ")
    assert f"node type {spot_type!r} is spot" in note
    worker = config.available_node_types[spot_type]
    assert worker.spot and worker.max_price == max_price
    assert config.node_type_spec(spot_type).spot
    assert not config.available_node_types[config.head_node_type].spot
    assert config.rsync_exclude == ["**/.git", "**/.git/**"]
    assert config.rsync_filter == [".gitignore"]


@pytest.mark.parametrize("provider, node_config, where", [
    ("aws", {"InstanceType": "m5.large", "InstanceMarketOptions": {"MarketType": "spot"}},
     "InstanceMarketOptions.MarketType: spot"),
    ("gcp", {"machineType": "n1-standard-2", "scheduling": {"provisioningModel": "SPOT"}},
     "scheduling.provisioningModel: SPOT"),
    ("gcp", {"machineType": "n1-standard-2", "scheduling": {"preemptible": True}},
     "scheduling.preemptible: true"),
])
def test_spot_false_beside_a_spot_idiom_is_an_error(tmp_path, provider, node_config, where):
    import yaml

    text = yaml.safe_dump({
        "cluster_name": "contra",
        "provider": {"type": provider, "region": "us-east-1", "project_id": "p",
                     "availability_zone": "us-east-1a"},
        "available_node_types": {"head": {"node_config": {k: v for k, v in node_config.items()
                                                          if k != "scheduling" and
                                                          k != "InstanceMarketOptions"}},
                                 "w": {"node_config": node_config, "spot": False}},
        "head_node_type": "head",
    }, sort_keys=False)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:{line_of(text, 'spot: false')}: available_node_types.w.spot: spot: false " \
           f"contradicts node_config.{where}" in str(info.value)


def test_spot_idioms_belong_to_the_providers():
    assert AWSProvider.spot_idiom({"InstanceMarketOptions": {"MarketType": "spot"}})
    assert AWSProvider.spot_idiom({"InstanceMarketOptions": {"MarketType": "capacity-block"}}) \
        is None
    assert AWSProvider.spot_idiom({"scheduling": {"preemptible": True}}) is None
    assert GCPProvider.spot_idiom({"scheduling": [{"preemptible": True}]}).path == \
        ("scheduling", 0, "preemptible")
    assert GCPProvider.spot_idiom({"scheduling": {"provisioningModel": "STANDARD"}}) is None
    assert GCPProvider.spot_idiom({"InstanceMarketOptions": {"MarketType": "spot"}}) is None


def test_gcp_list_scheduling_is_merged_into_the_insert_body():
    provider = GCPProvider({"type": "gcp", "project_id": "p",
                            "availability_zone": "us-central1-a"}, "c")
    spec = NodeTypeSpec("w", {"machineType": "n1-standard-2",
                              "scheduling": [{"preemptible": True}]}, spot=True)
    body = provider.instance_body(spec, "c-worker-1", "us-central1-a", {}, spot=True)
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["preemptible"] is True
    on_demand = provider.instance_body(spec, "c-worker-2", "us-central1-a", {}, spot=False)
    assert "preemptible" not in on_demand["scheduling"]


LEGACY = """\
cluster_name: old
min_workers: 1
max_workers: 3
initial_workers: 1
provider:
    type: aws
    region: us-east-1
head_node:
    InstanceType: m5.large
worker_nodes:
    InstanceType: m5.large
    InstanceMarketOptions:
        MarketType: spot
"""


def test_legacy_head_node_and_worker_nodes_become_node_types(tmp_path):
    path, config = _load(tmp_path, LEGACY)
    assert config.head_node_type == "head"
    head, worker = config.available_node_types["head"], config.available_node_types["worker"]
    assert head.node_config == {"InstanceType": "m5.large"} and head.max_workers == 0
    assert worker.node_config["InstanceType"] == "m5.large"
    assert (worker.min_workers, worker.max_workers, worker.spot) == (1, 3, True)
    assert config.warnings == [f"{path}:4: initial_workers: Ray-only key, ignored by strato "
                               "(legacy Ray key; set min_workers per node type)"]
    notes = config.notes
    assert notes[0].startswith(f"{path}:8: head_node: legacy Ray key translated: node type "
                               "'head'")
    assert notes[1].startswith(f"{path}:10: worker_nodes: legacy Ray key translated: node "
                               "type 'worker'") and "min_workers 1" in notes[1]
    assert "max_workers 3" in notes[1]
    assert notes[2].startswith(f"{path}:13: available_node_types.worker.node_config."
                               "InstanceMarketOptions.MarketType: ")


def test_legacy_errors_point_into_the_legacy_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(LEGACY.replace("min_workers: 1", "min_workers: 5"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:2: available_node_types.worker.min_workers: min_workers (5) is greater " \
           "than max_workers (3)" in str(info.value)


def test_legacy_keys_beside_node_types_stay_warnings(tmp_path):
    text = ("provider: {type: local}\navailable_node_types: {head: {}}\n"
            "head_node_type: head\nhead_node: {InstanceType: m5.large}\nmin_workers: 2\n")
    path, config = _load(tmp_path, text)
    assert [w.split(": ", 2)[1] for w in config.warnings] == ["head_node", "min_workers"]
    assert not config.notes


# ---------------------------------------------------------------- rsync filters
def _tree(root: Path) -> Path:
    files = {
        ".git/HEAD": "ref", ".gitignore": "data/\n*.ckpt\n!keep.ckpt\n",
        "data/big.bin": "x" * 100, "train.py": "print(1)", "a.ckpt": "c", "keep.ckpt": "k",
        "src/.gitignore": "*.tmp\n/build/\n", "src/x.tmp": "t", "src/m.py": "m",
        "src/build/out.o": "o", "src/deep/build/kept.o": "o", "src/deep/.git": "gitfile",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


KEPT = [".gitignore", "keep.ckpt", "src/.gitignore", "src/deep/build/kept.o", "src/m.py",
        "train.py"]


def test_copy_filter_follows_rsync_exclude_and_gitignore_files(tmp_path):
    src = _tree(tmp_path / "src")
    walk = CopyFilter(["**/.git", "**/.git/**"], [".gitignore"]).walk_local(src)
    kept = [rel for rel in _listing(src) if not any(
        walk.excluded("/".join(rel.split("/")[:i]), i < len(rel.split("/")))
        for i in range(1, len(rel.split("/")) + 1))]
    assert kept == KEPT
    assert not CopyFilter()  # no filter: everything copied
    assert CopyFilter().walk_local(src).excluded(".git", True) is False


def test_local_copies_and_the_setup_hash_honour_the_filter(tmp_path):
    src = _tree(tmp_path / "src")
    runner = LocalRunner("n", tmp_path / "node", OutputSink("n", None, echo=False))
    copy_filter = CopyFilter(["**/.git", "**/.git/**"], [".gitignore"])
    runner.put(src, "mnt", copy_filter=copy_filter)
    assert _listing(tmp_path / "node" / "mnt") == KEPT
    runner.get("mnt", tmp_path / "back", copy_filter=CopyFilter(["*.py"]))
    assert "train.py" not in _listing(tmp_path / "back")

    text = (f"provider: {{type: local}}\navailable_node_types: {{head: {{}}}}\n"
            f"head_node_type: head\nfile_mounts: {{/m: {src}}}\n"
            "rsync_exclude: ['**/.git']\nrsync_filter: [.gitignore]\n")
    _, config = _load(tmp_path, text)
    before = config.setup_hash("head")
    (src / "data" / "big.bin").write_text("changed, but excluded")
    (src / ".git" / "HEAD").write_text("moved")
    assert config.setup_hash("head") == before
    (src / "train.py").write_text("print(2)")
    assert config.setup_hash("head") != before
