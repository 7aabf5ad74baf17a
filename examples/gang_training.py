"""Data-parallel spot training with a placement group: one worker per node, reserved
together, moved together.

Two ``Worker`` actors live in one placement group (``STRICT_SPREAD`` on a cluster: one
bundle, say ``{"GPU": 1}``, per node; the autoscaler launches the nodes for the whole
group at once). Each step, each worker computes the gradient on its half of a
deterministic batch and the driver averages them; the driver checkpoints every
``--every`` steps. If a node of the group is preempted, the head reserves the whole group
again (the autoscaler replaces the node), both workers restart in it, and the driver
resumes from the last checkpoint: the final weights equal an uninterrupted run's.

    python examples/gang_training.py --steps 200                      # one local node
    python examples/gang_training.py --address auto --strategy STRICT_SPREAD \\
        --bundle '{"GPU": 1}'                                          # on a cluster
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import strato
from strato.util import placement_group, remove_placement_group
from strato.util.scheduling_strategies import PlacementGroupSchedulingStrategy

DIM = 32
WORKERS = 2


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(64, DIM))
    return x, x @ np.linspace(-1, 1, DIM) + 0.01 * rng.normal(size=64)


def gradient(w: np.ndarray, step: int, rank: int) -> np.ndarray:
    x, y = batch(step)
    x, y = x[rank::WORKERS], y[rank::WORKERS]
    return 2 * x.T @ (x @ w - y) / len(y)


def train_locally(steps: int, lr: float = 0.01) -> np.ndarray:
    w = np.random.default_rng(0).normal(size=DIM)
    for step in range(steps):
        w = w - lr * np.mean([gradient(w, step, r) for r in range(WORKERS)], axis=0)
    return w


@strato.remote(max_restarts=-1, max_task_retries=-1)
class Worker:
    def __init__(self, rank: int):
        self.rank = rank

    def gradient(self, w: np.ndarray, step: int) -> np.ndarray:
        return gradient(w, step, self.rank)

    def where(self) -> tuple[str, int]:
        return strato.get_runtime_context().get_node_id(), os.getpid()


def train(steps: int, every: int, key: str, workers: list, lr: float = 0.01) -> np.ndarray:
    state = strato.checkpoint.load(key) or {"w": np.random.default_rng(0).normal(size=DIM),
                                            "step": 0}
    w, step = state["w"], state["step"]
    while step < steps:
        try:
            grads = strato.get([wk.gradient.remote(w, step) for wk in workers], timeout=120)
        except (strato.exceptions.ActorError, strato.exceptions.GetTimeoutError):
            # a node of the group went away: the group and its workers come back
            # together; go on from the last checkpoint
            state = strato.checkpoint.load(key) or state
            w, step = state["w"], state["step"]
            continue
        w = w - lr * np.mean(grads, axis=0)
        step += 1
        if step % every == 0:
            strato.checkpoint.save(key, {"w": w, "step": step})
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--strategy", default="SPREAD")
    parser.add_argument("--bundle", default='{"CPU": 1}', help="one worker's resources (JSON)")
    parser.add_argument("--key", default="gang-training-demo")
    args = parser.parse_args()
    strato.init(address=args.address) if args.address else strato.init(num_cpus=WORKERS)
    strato.checkpoint.delete(args.key)
    pg = placement_group([json.loads(args.bundle)] * WORKERS, strategy=args.strategy)
    strato.get(pg.ready(), timeout=600)
    workers = [Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, rank))
               .remote(rank) for rank in range(WORKERS)]
    print("workers on", strato.get([wk.where.remote() for wk in workers]))
    w = train(args.steps, args.every, args.key, workers)
    expected = train_locally(args.steps)
    print(f"trained {args.steps} steps with {WORKERS} workers; equal to an uninterrupted "
          f"single-process run: {np.allclose(w, expected)}")
    remove_placement_group(pg)
    strato.shutdown()


if __name__ == "__main__":
    main()
