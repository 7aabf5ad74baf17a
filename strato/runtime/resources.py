"""What a node offers: detected cores, memory and GPUs, overridable from the command line."""

from __future__ import annotations

import os
import shutil
import subprocess

import psutil


def detect_gpus() -> tuple[int, str | None]:
    """Count GPUs with nvidia-smi (or CUDA_VISIBLE_DEVICES) and name their model."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        names = [line.strip() for line in out.splitlines() if line.strip()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():
            names = names[: len(visible.split(","))]
        if names:
            return len(names), accelerator_name(names[0])
    return 0, None


def accelerator_name(full: str) -> str:
    """'NVIDIA A10G' -> 'A10G', 'Tesla T4' -> 'T4', 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    words = [w for w in full.replace("-", " ").split() if w.upper() not in ("NVIDIA", "TESLA", "GEFORCE")]
    return words[0] if words else full


def node_resources(*, num_cpus: float | None = None, num_gpus: float | None = None,
                   memory: float | None = None, custom: dict | None = None) -> dict[str, float]:
    res: dict[str, float] = {}
    res["CPU"] = float(num_cpus if num_cpus is not None else (os.cpu_count() or 1))
    if num_gpus is None:
        count, name = detect_gpus()
        if count:
            res["GPU"] = float(count)
            res[f"accelerator_type:{name}"] = 1.0
    elif num_gpus:
        res["GPU"] = float(num_gpus)
    res["memory"] = float(memory if memory is not None else int(psutil.virtual_memory().total * 0.7))
    for key, value in (custom or {}).items():
        if value < 0:
            raise ValueError(f"resource {key!r} must be >= 0, got {value}")
        res[key] = float(value)
    return res
