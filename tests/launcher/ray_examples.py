"""Cluster YAMLs shaped like Ray's full examples for AWS and GCP (the same keys and idioms,
in our own words), shared by the config tests and the end-to-end tests against moto and
the GCE fake."""

from __future__ import annotations

AWS_EXAMPLE = """\
# A Ray user's full AWS cluster file, brought unchanged.
cluster_name: rayaws
max_workers: 2
upscaling_speed: 1.0
docker:
    image: "rayproject/ray-ml:latest-gpu"
    container_name: "ray_container"
    pull_before_run: true
idle_timeout_minutes: 5
provider:
    type: aws
    region: us-east-1
    availability_zone: us-east-1a,us-east-1b
    cache_stopped_nodes: true
auth:
    ssh_user: ubuntu
available_node_types:
    ray.head.default:
        resources: {}
        node_config:
            InstanceType: m5.large
            BlockDeviceMappings:
                - DeviceName: /dev/sda1
                  Ebs:
                      VolumeSize: 140
                      VolumeType: gp3
    ray.worker.default:
        min_workers: 1
        max_workers: 2
        resources: {}
        node_config:
            InstanceType: m5.large
            InstanceMarketOptions:
                MarketType: spot
                SpotOptions:
                    MaxPrice: "0.5"
head_node_type: ray.head.default
file_mounts: {}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude:
    - "**/.git"
    - "**/.git/**"
rsync_filter:
    - ".gitignore"
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands:
    - ray stop
    - ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml
worker_start_ray_commands:
    - ray stop
    - ray start --address=$RAY_HEAD_IP:6379
"""

GCP_EXAMPLE = """\
# A Ray user's full GCP cluster file, brought unchanged.
cluster_name: raygcp
max_workers: 2
upscaling_speed: 1.0
docker:
    image: "rayproject/ray-ml:latest-gpu"
    container_name: "ray_container"
idle_timeout_minutes: 5
provider:
    type: gcp
    region: us-central1
    availability_zone: us-central1-a
    project_id: strato-test
auth:
    ssh_user: ubuntu
available_node_types:
    ray_head_default:
        resources: {"CPU": 2}
        node_config:
            machineType: n1-standard-2
            disks:
              - boot: true
                autoDelete: true
                type: PERSISTENT
                initializeParams:
                  diskSizeGb: 50
                  sourceImage: projects/deeplearning-platform-release/global/images/family/common-cpu
    ray_worker_small:
        min_workers: 1
        max_workers: 2
        resources: {"CPU": 2}
        node_config:
            machineType: n1-standard-2
            disks:
              - boot: true
                autoDelete: true
                type: PERSISTENT
                initializeParams:
                  diskSizeGb: 50
                  sourceImage: projects/deeplearning-platform-release/global/images/family/common-cpu
            # workers on preemptible instances (comment out for on-demand)
            scheduling:
              - preemptible: true
head_node_type: ray_head_default
file_mounts: {}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude:
    - "**/.git"
    - "**/.git/**"
rsync_filter:
    - ".gitignore"
initialization_commands: []
setup_commands: []
head_setup_commands:
  - echo head setup
worker_setup_commands: []
head_start_ray_commands:
    - ray stop
    - ray start --head --port=6379
worker_start_ray_commands:
    - ray stop
    - ray start --address=$RAY_HEAD_IP:6379
"""

# the top-level keys each example is warned about (Ray-only, ignored by strato)
RAY_ONLY_KEYS = ["docker", "cluster_synced_files", "file_mounts_sync_continuously",
                 "head_start_ray_commands", "worker_start_ray_commands"]


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first line of ``text`` that starts (after indentation)
    with ``needle``."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith(needle):
            return number
    raise AssertionError(f"{needle!r} not in the example")
