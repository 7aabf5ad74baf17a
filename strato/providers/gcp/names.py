"""Names GCE accepts and names strato reads back: labels, resource names, machine types
and accelerators. Pure functions of their arguments: no API calls.

Tags become GCE *labels*: keys and values are lower-cased and reduced to ``[a-z0-9_-]``
(at most 63 characters), so values read back are the sanitized form. Machine type names
encode their shape (``n1-standard-4``, ``a2-highgpu-2g``, ``n2-custom-8-32768``), so
vCPUs, memory and built-in GPUs are read from the name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

# Names strato keeps in labels (cluster, node types): lower-case letters, digits, - and _.
LABEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# GCE accelerator type -> the name used in ``accelerator_type:<NAME>`` resources.
ACCELERATOR_NAMES = {
    "nvidia-tesla-k80": "K80",
    "nvidia-tesla-p4": "P4",
    "nvidia-tesla-p100": "P100",
    "nvidia-tesla-v100": "V100",
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-a100": "A100",
    "nvidia-a100-80gb": "A100-80G",
    "nvidia-l4": "L4",
    "nvidia-h100-80gb": "H100",
    "nvidia-h100-mega-80gb": "H100",
    "nvidia-h200-141gb": "H200",
    "nvidia-b200": "B200",
}

# Accelerator-optimized families carry their GPUs in the machine type itself:
# family -> (accelerator type, vCPUs per GPU, GiB per GPU).
_GPU_FAMILIES = {
    "a2-highgpu": ("nvidia-tesla-a100", 12, 85),
    "a2-megagpu": ("nvidia-tesla-a100", 6, 85),
    "a2-ultragpu": ("nvidia-a100-80gb", 12, 170),
    "a3-highgpu": ("nvidia-h100-80gb", 26, 234),
    "a3-megagpu": ("nvidia-h100-mega-80gb", 26, 234),
    "a3-edgegpu": ("nvidia-h100-80gb", 26, 234),
    "a3-ultragpu": ("nvidia-h200-141gb", 28, 368),
}
# g2-standard-<vCPUs>: one L4 up to 16 vCPUs, then these.
_G2_GPUS = {24: 2, 32: 1, 48: 4, 96: 8}
# GiB per vCPU by (series, class); n1 differs from the newer series.
_GIB_PER_VCPU = {
    ("n1", "standard"): 3.75, ("n1", "highmem"): 6.5, ("n1", "highcpu"): 0.9,
    ("standard",): 4.0, ("highmem",): 8.0, ("highcpu",): 1.0,
}
_SHARED_CORE = {"e2-micro": (2, 1), "e2-small": (2, 2), "e2-medium": (2, 4),
                "f1-micro": (1, 0.6), "g1-small": (1, 1.7)}


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:6]


def label_value(value: Any) -> str:
    """A tag value as a valid label value: lower-case ``[a-z0-9_-]``, at most 63 chars (a
    longer one keeps 56 and a hash of the whole, so long values never collide)."""
    text = re.sub(r"[^a-z0-9_-]", "-", str(value).lower())
    return text if len(text) <= 63 else f"{text[:56]}-{_short_hash(str(value))}"


def label_key(key: str) -> str:
    """A tag key as a valid label key (must also start with a letter)."""
    value = label_value(key)
    return value if value[:1].isalpha() else f"k{value}"[:63]


def resource_name(text: str, max_len: int = 63) -> str:
    """A valid GCE resource name: ``[a-z]([-a-z0-9]*[a-z0-9])?``."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if not name[:1].isalpha():
        name = f"s-{name}"
    return name[:max_len].rstrip("-")


def cluster_prefix(cluster_name: str, max_len: int = 40) -> str:
    """``strato-<cluster>``: the start of instance names, the network tag and firewall
    rule names. A name that had to be shortened or rewritten ends in a hash of the
    cluster name, so two clusters never share a prefix (``a_b`` vs ``a-b``, or long
    names alike in their first 40 characters)."""
    plain = f"strato-{cluster_name}"
    name = resource_name(plain, max_len=max_len)
    if name == plain:
        return name
    return f"{resource_name(plain, max_len=max_len - 7)}-{_short_hash(cluster_name)}"


def short(url: str) -> str:
    """Last path segment: ``.../zones/us-central1-a`` -> ``us-central1-a``."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def parse_time(text: str) -> float | None:
    """Unix seconds of a GCE RFC 3339 timestamp (None if empty or unreadable)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def accelerator_name(accelerator_type: str) -> str:
    """``nvidia-tesla-t4`` -> ``T4``; unknown types lose ``nvidia-``/``tesla-``, upper-cased."""
    bare = short(accelerator_type).removesuffix("-vws")
    if bare in ACCELERATOR_NAMES:
        return ACCELERATOR_NAMES[bare]
    return re.sub(r"^(nvidia-)?(tesla-)?", "", bare).upper()


def machine_shape(machine_type: str) -> tuple[float | None, float | None, int, str | None]:
    """(vCPUs, GiB, built-in GPUs, built-in accelerator type) from a machine type name.

    Names encode the shape (``n1-standard-4``, ``a2-highgpu-2g``, ``n2-custom-8-32768``),
    so no API call is needed; unknown parts come back as None/0.
    """
    name = short(machine_type)
    if name in _SHARED_CORE:
        cpus, gib = _SHARED_CORE[name]
        return float(cpus), float(gib), 0, None
    custom = re.search(r"(?:^|-)custom-(\d+)-(\d+)(?:-ext)?$", name)
    if custom:
        return float(custom.group(1)), int(custom.group(2)) / 1024, 0, None
    gpu = re.fullmatch(r"([a-z]\d+-[a-z]+gpu)-(\d+)g", name)
    if gpu and gpu.group(1) in _GPU_FAMILIES:
        acc, cpus_per_gpu, gib_per_gpu = _GPU_FAMILIES[gpu.group(1)]
        n = int(gpu.group(2))
        return float(cpus_per_gpu * n), float(gib_per_gpu * n), n, acc
    parts = name.split("-")
    cpus = float(parts[-1]) if len(parts) >= 3 and parts[-1].isdigit() else None
    if parts[0] == "g2" and cpus:
        return cpus, cpus * 4.0, _G2_GPUS.get(int(cpus), 1), "nvidia-l4"
    gib = None
    if cpus and len(parts) >= 3:
        per = _GIB_PER_VCPU.get((parts[0], parts[1])) or _GIB_PER_VCPU.get((parts[1],))
        gib = cpus * per if per else None
    return cpus, gib, 0, None


def is_spot(inst: Any) -> bool:
    """Whether a compute_v1 Instance is a spot (or preemptible) VM."""
    return inst.scheduling.provisioning_model == "SPOT" or bool(inst.scheduling.preemptible)


def merged_scheduling(value: Any) -> dict[str, Any]:
    """node_config's ``scheduling`` as one mapping; Ray's examples write it as a list of
    mappings (``- preemptible: true``), which are merged in order."""
    if isinstance(value, list):
        merged: dict[str, Any] = {}
        for part in value:
            if isinstance(part, Mapping):
                merged.update(part)
        return merged
    return dict(value or {})
