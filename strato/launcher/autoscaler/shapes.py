"""Resource shapes and the arithmetic the planner packs them with.

A shape is a mapping like ``{CPU: 1, GPU: 0.5}``; a ``Bin`` is one node's free resources.
Kept apart from the rules so that packing demand, placing gangs and choosing types share
one definition of "fits".
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Resources = Mapping[str, float]

_EPS = 1e-9


def fit_count(free: Resources, shape: Resources) -> int:
    """How many copies of `shape` fit into `free`."""
    n = sys.maxsize
    for key, need in shape.items():
        if need > 0:
            n = min(n, math.floor(free.get(key, 0.0) / need + _EPS))
    return max(n, 0)


def format_shape(shape: Resources) -> str:
    """`{CPU: 1, GPU: 0.5}`: compact, for reasons and warnings."""
    parts = []
    for key, value in shape.items():
        text = str(int(value)) if float(value).is_integer() else f"{value:g}"
        parts.append(f"{key}: {text}")
    return "{" + ", ".join(parts) + "}"


def is_cpu_only(shape: Resources) -> bool:
    return shape.get("GPU", 0.0) <= 0


def ffd_key(shape: Resources) -> tuple[float, float, float, float]:
    """Decreasing order for first-fit: scarce resources (GPU, custom) before CPU, memory."""
    custom = sum(v for k, v in shape.items() if k not in ("CPU", "GPU", "memory"))
    return (shape.get("GPU", 0.0), custom, shape.get("CPU", 0.0), shape.get("memory", 0.0))


def sum_shapes(shapes: Iterable[Resources]) -> dict[str, float]:
    out: dict[str, float] = {}
    for shape in shapes:
        for key, value in shape.items():
            out[key] = out.get(key, 0.0) + value
    return out


@dataclass
class Bin:
    """Free resources of one node (existing, pending, or launched this tick)."""

    node_type: str
    free: dict[str, float]
    node_id: str | None = None  # None: launched this tick
    registered: bool = False
    used: bool = False

    def take(self, shape: Resources, copies: int) -> None:
        for key, need in shape.items():
            self.free[key] = self.free.get(key, 0.0) - need * copies
        self.used = True
