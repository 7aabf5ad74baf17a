"""Options of ``@remote`` and ``.options()``: checked once, with the key named and a
did-you-mean, and turned into the resource shape the scheduler asks for."""

from __future__ import annotations

import difflib

from strato.runtime import placement, scheduler

TASK_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "max_retries",
                "retry_exceptions", "num_returns", "name", "runtime_env", "scheduling_strategy",
                "retention_s"}
ACTOR_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type",
                 "max_restarts", "max_task_retries", "name", "namespace", "lifetime",
                 "max_concurrency", "runtime_env", "scheduling_strategy", "get_if_exists"}


def check_options(options: dict, allowed: set, where: str) -> None:
    for key, value in options.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown option {key!r}{hint}")
        if key in ("num_cpus", "num_gpus", "memory") and value is not None:
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: option {key}={value!r} must be a number >= 0")
        if key == "resources" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: option resources must be a dict, got {type(value).__name__}")
            for name, amount in value.items():
                if name in ("CPU", "GPU"):
                    raise ValueError(f"{where}: use num_cpus/num_gpus instead of resources[{name!r}]")
                if not isinstance(amount, (int, float)) or amount < 0:
                    raise ValueError(f"{where}: resources[{name!r}]={amount!r} must be a number >= 0")
        if key == "num_returns" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: num_returns must be an int >= 1, got {value!r}")
        if key in ("max_retries", "max_restarts", "max_task_retries") and \
                (not isinstance(value, int) or value < -1):
            raise ValueError(f"{where}: {key} must be an int >= -1, got {value!r}")
        if key == "retention_s" and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}: retention_s must be a number of seconds > 0, got "
                             f"{value!r}")
        if key == "max_concurrency" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: max_concurrency must be an int >= 1, got {value!r}")
        if key == "lifetime" and value not in (None, "detached", "non_detached"):
            raise ValueError(f"{where}: lifetime must be 'detached' or None, got {value!r}")


def resources_of(options: dict, default_cpu: float) -> dict:
    res = {}
    cpu = options.get("num_cpus")
    cpu = default_cpu if cpu is None else cpu
    if cpu:
        res["CPU"] = float(cpu)
    if options.get("num_gpus"):
        res["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        res["memory"] = float(options["memory"])
    for k, v in (options.get("resources") or {}).items():
        if v:
            res[k] = float(v)
    if options.get("accelerator_type"):
        res[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return res


def placed(resources: dict, options: dict, where: str) -> dict:
    """The shape to ask for under ``scheduling_strategy``: inside a placement group's
    bundle (``PlacementGroupSchedulingStrategy``) it is renamed to that bundle's
    resources (``placement.group_shape``); other strategies change nothing."""
    strategy = options.get("scheduling_strategy")
    pg = getattr(strategy, "placement_group", None)
    if pg is None:
        return resources
    index = strategy.placement_group_bundle_index
    bundles = pg.bundle_specs
    if not isinstance(index, int) or not -1 <= index < len(bundles):
        raise ValueError(f"{where}: placement_group_bundle_index={index!r} is out of range "
                         f"for a group of {len(bundles)} bundle(s)")
    candidates = bundles if index == -1 else [bundles[index]]
    if not any(scheduler.fits(resources, b) for b in candidates):
        which = "any bundle" if index == -1 else f"bundle {index} ({bundles[index]})"
        raise ValueError(f"{where}: needs {resources}, more than {which} of placement "
                         f"group {pg.id.hex()[:8]} reserves")
    return placement.group_shape(resources, pg.id.hex(), index)
